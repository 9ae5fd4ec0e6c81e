"""The live terminal view of a local deployment and the closing plot of replicas and latency over time."""

from __future__ import annotations

import math
import shutil
import sys
from typing import TextIO

from tideserve.local.runtime import TimelinePoint

HEADER = (f"{'time':>6} {'replicas':>8} {'ready':>5} {'max_seqs':>8} {'tokens':>6} {'TTFT p90':>9} {'TPOT p90':>9} "
          f"{'attain':>7} {'queue':>5} {'req/s':>6} {'MBU':>6}  decision")


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * 1000:.0f}ms"


def format_row(point: TimelinePoint, start: float) -> str:
    attain = "-" if point.attainment is None else f"{100 * point.attainment:.1f}%"
    rate = "-" if point.rate is None else f"{point.rate:.2f}"
    mbu = "-" if point.mbu is None else f"{100 * point.mbu:.1f}%"
    decision = "STALE metrics: hold" if point.stale else point.action
    return (f"{point.time - start:>5.0f}s {point.desired:>8} {point.ready:>5} {point.max_num_seqs:>8} "
            f"{point.max_num_batched_tokens:>6} {_ms(point.ttft_p):>9} {_ms(point.tpot_p):>9} {attain:>7} "
            f"{point.waiting:>5.0f} {rate:>6} {mbu:>6}  {decision}")


class LiveView:
    """On a terminal: a panel redrawn every interval (latest rows, the last reason, a status line). Elsewhere
    (a log file, CI): one line per interval."""

    def __init__(self, title: str, stream: TextIO = sys.stdout, rows: int = 18):
        self.title, self.stream, self.rows = title, stream, rows
        self.tty = stream.isatty()
        self.lines: list[str] = []
        self.start: float | None = None
        self.status = ""
        self.last_reason = ""
        self._header_printed = False

    def update(self, point: TimelinePoint) -> None:
        if self.start is None:
            self.start = point.time
        row = format_row(point, self.start)
        self.lines.append(row)
        if self.tty:
            self._redraw(point.reason)
        else:
            if not self._header_printed:
                print(HEADER, file=self.stream)
                self._header_printed = True
            print(row + (f"  [{point.reason}]" if point.action != "hold" else ""), file=self.stream, flush=True)

    def set_status(self, text: str) -> None:
        self.status = text
        if self.tty and self.lines:
            self._redraw(None)

    def _redraw(self, reason: str | None) -> None:
        width = shutil.get_terminal_size((120, 30)).columns
        out = ["\x1b[H\x1b[2J" + self.title, HEADER, *self.lines[-self.rows:]]
        if reason:
            self.last_reason = reason
        out.append("")
        out.append(("last: " + self.last_reason)[:width])
        out.append(self.status[:width])
        print("\n".join(out), file=self.stream, flush=True)


def plot_timeline(points: list[TimelinePoint], path: str, title: str, slo_ttft_s: float, slo_tpot_s: float,
                  offered_rate: list[tuple[float, float]] | None = None) -> None:
    """Replicas and batch limit, latency tails against their targets, and load over time, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = points[0].time
    t = [p.time - start for p in points]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    ax = axes[0]
    ax.step(t, [p.desired for p in points], where="post", label="desired replicas")
    ax.step(t, [p.ready for p in points], where="post", label="ready replicas", linestyle="--")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper left")
    twin = ax.twinx()
    twin.step(t, [p.max_num_seqs for p in points], where="post", color="tab:red", alpha=0.6, label="max_num_seqs")
    twin.set_ylabel("max_num_seqs", color="tab:red")
    ax = axes[1]
    nan = float("nan")
    ax.plot(t, [p.ttft_p if p.ttft_p is not None else nan for p in points], marker=".", label="TTFT p90")
    ax.plot(t, [p.tpot_p if p.tpot_p is not None else nan for p in points], marker=".", label="TPOT p90")
    ax.axhline(slo_ttft_s, color="tab:blue", linestyle=":", label="TTFT target")
    ax.axhline(slo_tpot_s, color="tab:orange", linestyle=":", label="TPOT target")
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    ax.plot(t, [p.rate if p.rate is not None else nan for p in points], label="measured arrivals (req/s)")
    if offered_rate:
        ax.plot([x - start for x, _ in offered_rate], [y for _, y in offered_rate], linestyle="--",
                label="offered by the load generator")
    ax.plot(t, [p.waiting for p in points], label="queue (waiting requests)", alpha=0.7)
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
