"""The Grafana dashboard the chart ships, read without Grafana: its queries with the variables filled in, run
against a Prometheus, and drawn as one PNG of its panels (`tideserve dashboard`).

Grafana substitutes `$namespace` and `$llmdeployment` (dashboard variables) and `$__rate_interval` /
`$__interval` (from the panel's time range and the scrape interval) before it sends a query; `substitute`
does the same with values given here, so that the tests and this rendering run exactly the dashboard's
PromQL.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tideserve.monitoring.prometheus import DASHBOARD_FILE, PrometheusAPI


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    legend: str
    expr: str


def load(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every panel target, then every annotation query (its panel name is "annotations: NAME")."""
    found = [PanelQuery(p["title"], t.get("legendFormat", ""), t["expr"])
             for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [PanelQuery(f"annotations: {a['name']}", a.get("titleFormat", ""), a["expr"])
              for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]
    return found


def substitute(expr: str, variables: dict[str, str], rate_interval: str, interval: str) -> str:
    """The query Grafana would send: `$__rate_interval` and `$__interval` first (they share a prefix with
    nothing else), then each `$name` and `${name}` of a dashboard variable."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval)
    for name in sorted(variables, key=len, reverse=True):
        out = out.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    if "$" in out:
        raise ValueError(f"unsubstituted variable in {out!r}")
    return out


def _legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out or ",".join(f"{k}={v}" for k, v in labels.items())


def render(api: PrometheusAPI, dashboard: dict[str, Any], variables: dict[str, str], start: float, end: float,
           out: Path, step_s: float | None = None, rate_interval: str = "1m") -> dict[str, int]:
    """Query every panel over [start, end] and draw the panels in the dashboard's order, two per row, with the
    annotation query's points as vertical lines. Returns the number of series each panel got."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_s = step_s or max(1.0, (end - start) / 300)
    interval = f"{max(1, round(step_s))}s"
    queries = panel_queries(dashboard)
    panels = [p["title"] for p in dashboard["panels"]]
    series_per_panel = {title: 0 for title in panels}
    marks: list[tuple[float, str]] = []
    for pq in queries:
        if not pq.panel.startswith("annotations: "):
            continue
        for series in api.query_range(substitute(pq.expr, variables, rate_interval, interval), start, end, step_s):
            # A decision stays in the query's window for a while: mark where each run of steps begins.
            label, previous = _legend(pq.legend, series["metric"]), None
            for t, v in series["values"]:
                if float(v) > 0 and (previous is None or float(t) - previous > 1.5 * step_s):
                    marks.append((float(t), label))
                previous = float(t) if float(v) > 0 else None
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 2.6 * rows), squeeze=False)
    for index, title in enumerate(panels):
        ax = axes[index // 2][index % 2]
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        for pq in (q for q in queries if q.panel == title):
            for series in api.query_range(substitute(pq.expr, variables, rate_interval, interval), start, end,
                                          step_s):
                times = [(float(t) - start) / 60 for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                style = {"linestyle": "--", "color": "red"} if pq.legend == "target" else {}
                ax.plot(times, values, label=_legend(pq.legend, series["metric"]), linewidth=1, **style)
                series_per_panel[title] += 1
        for at, _ in marks:
            ax.axvline((at - start) / 60, color="orange", alpha=0.35, linewidth=0.8)
        if series_per_panel[title]:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
        ax.set_xlim(0, (end - start) / 60)
        if index // 2 == rows - 1:
            ax.set_xlabel("minutes", fontsize=7)
    for index in range(len(panels), rows * 2):
        axes[index // 2][index % 2].axis("off")
    fig.suptitle(f"{dashboard['title']} ({variables.get('namespace')}/{variables.get('llmdeployment')}; "
                 "orange lines: autoscaler decisions)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return series_per_panel


def _duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 15m or 2h") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prometheus-url", required=True, help="the Prometheus that scrapes the deployment")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--llmdeployment", required=True, help="the LLMDeployment's name")
    parser.add_argument("--since", type=_duration_s, default=_duration_s("1h"), help="how far back (default 1h)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for (default 1m)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD_FILE, help="a dashboard JSON (default: shipped)")
    parser.add_argument("--out", type=Path, default=Path("tideserve-dashboard.png"))


def run(args: argparse.Namespace) -> int:
    end = time.time()
    try:
        counts = render(PrometheusAPI(args.prometheus_url), load(args.dashboard),
                        {"namespace": args.namespace, "llmdeployment": args.llmdeployment}, end - args.since, end,
                        args.out, rate_interval=args.rate_interval)
    except (OSError, ValueError, httpx.HTTPError) as exc:
        print(f"tideserve dashboard: {exc}", file=sys.stderr)
        return 1
    empty = [title for title, n in counts.items() if not n]
    print(f"wrote {args.out}: {len(counts) - len(empty)} of {len(counts)} panels with data"
          + (f" (empty: {', '.join(empty)})" if empty else ""))
    return 0
