"""Per-policy results of a simulation: SLO attainment, GPU-hours, goodput, actions; a table, JSON and plots."""

from __future__ import annotations

import json

import numpy as np

from tideserve.sim.simulator import SimResult

BOUNDS = ("hindsight",)  # rows that read the trace's future: bounds to compare with, never baselines


def summarize(result: SimResult, ttft_s: float, tpot_s: float, percentile: float = 90.0,
              window_s: float = 300.0) -> dict:
    good = (result.ttft <= ttft_s) & (result.tpot <= tpot_s)
    windows = (result.arrival // window_s).astype(int)
    met = total = 0
    if len(windows):
        order = np.argsort(windows, kind="stable")
        bounds = np.flatnonzero(np.diff(windows[order])) + 1
        for group in np.split(order, bounds):
            total += 1
            met += (np.percentile(result.ttft[group], percentile) <= ttft_s
                    and np.percentile(result.tpot[group], percentile) <= tpot_s)
    gpu_hours = result.gpu_seconds / 3600
    return {
        "policy": result.policy,
        "requests": int(len(good)),
        "request_attainment": float(good.mean()) if len(good) else None,
        "window_attainment": met / total if total else None,
        "gpu_hours": gpu_hours,
        "mean_replicas": result.gpu_seconds / result.duration_s if result.duration_s else 0.0,
        "max_replicas": float(np.max(result.timeline["gpus"])) if len(result.timeline["gpus"]) else 0.0,
        "goodput_tokens_per_gpu_s": float(result.output_tokens[good].sum() / result.gpu_seconds)
        if result.gpu_seconds else 0.0,
        "scaling_actions": result.decisions,
        "batch_limit_changes": result.batch_limit_changes,
        "ttft_p50_s": _pct(result.ttft, 50), "ttft_p99_s": _pct(result.ttft, 99),
        "tpot_p50_s": _pct(result.tpot, 50), "tpot_p99_s": _pct(result.tpot, 99),
        "decisions_by_action": result.reasons,
        "prefix_cache_hit_rate": result.prefix_cache_hit_rate,
    }


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def compare(summaries: list[dict], reference: str = "tideserve", attainment_goal: float = 0.99) -> dict:
    """GPU-hours of the reference policy against static-at-peak and the cheapest baseline with the same
    request attainment (the issue's acceptance ratios)."""
    by_name = {s["policy"]: s for s in summaries}
    ours = by_name.get(reference)
    if ours is None:
        return {}
    out = {"reference": reference, "attainment_goal": attainment_goal,
           "reference_meets_goal": ours["request_attainment"] >= attainment_goal}
    if "static-peak" in by_name:
        out["gpu_hours_vs_static_peak"] = ours["gpu_hours"] / by_name["static-peak"]["gpu_hours"]
    peers = [s for s in summaries if s["policy"] not in (reference, *BOUNDS)
             and s["request_attainment"] >= min(ours["request_attainment"], attainment_goal)]
    if peers:
        cheapest = min(peers, key=lambda s: s["gpu_hours"])
        out["cheapest_baseline_with_same_attainment"] = cheapest["policy"]
        out["gpu_hours_vs_cheapest_baseline"] = ours["gpu_hours"] / cheapest["gpu_hours"]
    return out


def format_table(summaries: list[dict]) -> str:
    header = (f"{'policy':<14}{'req SLO %':>10}{'5-min win %':>12}{'GPU-h':>9}{'mean rep':>9}{'max rep':>8}"
              f"{'goodput tok/GPU-s':>19}{'actions':>8}{'batch chg':>10}{'TTFT p99 s':>11}{'TPOT p99 ms':>12}")
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(
            f"{s['policy']:<14}{100 * s['request_attainment']:>10.2f}{100 * (s['window_attainment'] or 0):>12.1f}"
            f"{s['gpu_hours']:>9.2f}{s['mean_replicas']:>9.2f}{s['max_replicas']:>8.0f}"
            f"{s['goodput_tokens_per_gpu_s']:>19.1f}{s['scaling_actions']:>8}{s['batch_limit_changes']:>10}"
            f"{s['ttft_p99_s']:>11.2f}{1000 * s['tpot_p99_s']:>12.1f}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)


def plot(results: list[SimResult], path: str, ttft_s: float, tpot_s: float, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(13, 12), sharex=True)
    budget_ax = axes[3].twinx()
    budget_ax.set_ylabel("tokens per step (dashed)")
    hours = lambda t: np.asarray(t) / 3600  # noqa: E731
    load_ax = axes[0].twinx()
    ref = results[0].timeline
    load_ax.plot(hours(ref["time"]), ref["arrival_rate"], color="0.75", lw=0.8, label="arrival rate")
    load_ax.set_ylabel("requests/s", color="0.5")
    for r in results:
        tl = r.timeline
        axes[0].step(hours(tl["time"]), tl["gpus"], where="post", lw=1.1, label=r.policy)
        axes[1].plot(hours(tl["time"]), tl["ttft_p90"], lw=0.8, label=r.policy)
        axes[2].plot(hours(tl["time"]), 1000 * tl["tpot_p90"], lw=0.8, label=r.policy)
        line, = axes[3].step(hours(tl["time"]), tl["max_num_seqs"], where="post", lw=1.0, label=r.policy)
        budget_ax.step(hours(tl["time"]), tl["max_num_batched_tokens"], where="post", lw=0.8, ls="--",
                       color=line.get_color())
    axes[0].set_ylabel("replicas (GPUs)")
    axes[0].legend(loc="upper left", ncol=4, fontsize=8)
    axes[1].axhline(ttft_s, color="k", ls="--", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("TTFT p90 per interval (s)")
    axes[2].axhline(1000 * tpot_s, color="k", ls="--", lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("TPOT p90 per interval (ms)")
    axes[3].set_ylabel("max_num_seqs (solid)")
    axes[3].set_xlabel("simulated hours")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
