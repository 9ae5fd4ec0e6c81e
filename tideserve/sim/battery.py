"""`tideserve simulate --battery`: every policy on a battery of scenarios the autoscaler was not tuned on, one
scoreboard (table, JSON, PNG grid).

Each scenario fixes its workload (trace, rate and time scaling, length), the simulated engine (step costs and KV
capacity against the 8B-on-H100 profile the autoscaler bootstraps from) and the replicas' start-up. The
deployment is the default simulate YAML (tideserve/data/simulate-llmdeployment.yaml: 99% of requests within
TTFT 2 s and TPOT 50 ms, maxReplicas 64, CRD defaults elsewhere). Baselines run twice: on vLLM's default limits and
on the static limits that benchmark best for the scenario (NAME-tuned). Traces other than the packaged Azure and
ServeGen m-large ones are read from ../shared/traces (--shared): a scenario whose data is missing is skipped,
and the scoreboard says so.

The bars (docs/autoscaling.md): a* = min(goal, the best attainment any baseline reaches) - 0.5 pp; Tideserve must
reach a* at no more GPU-hours than the cheapest online baseline that does, and at most 1.05x the cheapest fixed
fleet that does.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tideserve.sim import cli

ONLINE = ("hpa", "llm-d", "llm-d-goal", "dynamo", "kubeai")
FIXED = ("static-peak", "static-mean")
SLACK = 0.005  # a* is 0.5 pp below the best baseline's attainment (or the goal)


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str  # azure-conv | azure-code | servegen:MODEL | mooncake | reasoning | ramp
    rate_scale: float = 1.0
    time_scale: float = 1.0
    days: float | None = None  # ServeGen: the first N days
    rate: float = 0.0  # synthetic workloads: requests/s
    step_cost: float = 1.0  # the true engine's step costs against the bootstrap profile
    kv_capacity: float = 1.0  # and its KV capacity
    startup_s: float = 90.0
    cold: bool = False  # every policy starts at minReplicas
    quick: bool = False  # in the --quick subset
    hindsight: bool = False  # the hindsight bound fits the time here
    what: str = ""


SCENARIOS = (
    Scenario("servegen-m-large-14d", "servegen:m-large", rate_scale=0.002, time_scale=48, days=14,
             what="14 days of ServeGen m-large, a day in 30 minutes"),
    Scenario("servegen-m-mid-14d", "servegen:m-mid", rate_scale=0.0002, time_scale=48, days=14,
             what="14 days of ServeGen m-mid, a day in 30 minutes"),
    Scenario("servegen-m-small-14d", "servegen:m-small", rate_scale=0.0003, time_scale=48, days=14,
             what="14 days of ServeGen m-small, a day in 30 minutes"),
    Scenario("azure-conv-x5", "azure-conv", rate_scale=5, hindsight=True, what="Azure conversation hour, rate x5"),
    Scenario("azure-conv-x10", "azure-conv", rate_scale=10, quick=True, what="Azure conversation hour, rate x10"),
    Scenario("azure-conv-x20", "azure-conv", rate_scale=20, what="Azure conversation hour, rate x20"),
    Scenario("azure-code-x5", "azure-code", rate_scale=5, hindsight=True, what="Azure code hour, rate x5"),
    Scenario("azure-code-x10", "azure-code", rate_scale=10, what="Azure code hour, rate x10"),
    Scenario("azure-code-x20", "azure-code", rate_scale=20, what="Azure code hour, rate x20"),
    Scenario("mooncake", "mooncake", quick=True, what="Mooncake synthetic: 17 minutes of 10k-190k-token prompts"),
    Scenario("reasoning", "reasoning", rate=0.3, quick=True,
             what="an hour at 0.3 req/s, outputs heavy-tailed over 1k-16k tokens"),
    Scenario("reasoning-x10", "reasoning", rate=3.0, quick=True, what="the same at 3 req/s"),
    Scenario("cold-ramp", "ramp", rate=16.0, cold=True, quick=True,
             what="from cold at minReplicas: 1, 2, 4, 8, 16 req/s for 12 minutes each (Azure conversation lengths)"),
    Scenario("startup-30s", "azure-conv", rate_scale=10, startup_s=30, what="azure-conv-x10, 30 s start-up"),
    Scenario("startup-300s-cold", "azure-conv", rate_scale=10, startup_s=300, cold=True,
             what="azure-conv-x10, 300 s start-up, from cold"),
    Scenario("engine-x0.5", "azure-conv", rate_scale=10, step_cost=0.5,
             what="azure-conv-x10 on an engine twice as fast per step as the bootstrap profile"),
    Scenario("engine-x2", "azure-conv", rate_scale=10, step_cost=2.0, quick=True,
             what="azure-conv-x10 on an engine twice as slow per step as the bootstrap profile"),
    Scenario("kv-x0.25", "azure-conv", rate_scale=10, kv_capacity=0.25,
             what="azure-conv-x10 with a quarter of the bootstrap profile's KV capacity"),
)


def workload(scenario: Scenario, shared: Path, seed: int = 0) -> cli.Workload:
    """(arrivals, inputs, outputs) of a scenario. Raises FileNotFoundError when its data is not here."""
    from tideserve import traces

    kind = scenario.workload
    if kind in ("azure-conv", "azure-code"):
        requests = traces.scale_rate(traces.load_trace(kind), scenario.rate_scale, seed=seed)
    elif kind.startswith("servegen:"):
        from tideserve.sim import servegen

        model = kind.split(":", 1)[1]
        try:
            data = servegen.load_extract(model)
        except ValueError:
            if not (shared / "traces" / "servegen" / "servegen_rate_traces.tar.xz").exists():
                raise FileNotFoundError(f"ServeGen {model}: no shipped extract and no archives in {shared}/traces")
            data = servegen.extract(shared / "traces" / "servegen", model)
        requests = servegen.synthesize(data, rate_scale=scenario.rate_scale, time_scale=scenario.time_scale,
                                       days=scenario.days, seed=seed, max_total=8192)
    elif kind == "mooncake":
        path = shared / "traces" / "mooncake" / "synthetic_trace.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no Mooncake trace at {path}")
        requests = traces.load_trace(path)
    elif kind == "reasoning":
        return cli.Workload(*_reasoning(scenario.rate, 3600.0, seed))
    elif kind == "ramp":
        return cli.Workload(*_ramp(scenario.rate, seed))
    else:
        raise ValueError(f"unknown workload {kind!r}")
    return cli.Workload.of(requests)


def _reasoning(rate: float, duration_s: float, seed: int):
    """A reasoning model's traffic: Poisson arrivals, prompts of a few hundred tokens (log-normal around 600),
    and outputs Pareto-tailed (shape 1.2) from 1k up to 16k tokens."""
    rng = np.random.default_rng(seed)
    n = int(rate * duration_s)
    arrivals = np.sort(rng.uniform(0, duration_s, n))
    inputs = np.clip(np.exp(rng.normal(np.log(600), 0.8, n)), 50, 8000).astype(int)
    outputs = np.clip(1000 * (1 + rng.pareto(1.2, n)), 1000, 16000).astype(int)
    return arrivals, inputs, outputs


def _ramp(top_rate: float, seed: int, step_s: float = 720.0):
    """Rate doubling every step_s up to top_rate (1, 2, 4, ... req/s), lengths drawn from Azure conversation."""
    from tideserve import traces

    rng = np.random.default_rng(seed)
    rates = [2.0**i for i in range(int(math.log2(top_rate)) + 1)]
    arrivals = np.concatenate([i * step_s + np.sort(rng.uniform(0, step_s, int(r * step_s)))
                               for i, r in enumerate(rates)])
    lengths = traces.sample_lengths(traces.load_trace("azure-conv"), len(arrivals), seed=seed)
    return arrivals, np.array([i for i, _ in lengths]), np.array([o for _, o in lengths])


def engine(scenario: Scenario):
    from tideserve.autoscaler.perf_model import H100_8B

    m = scenario.step_cost
    return replace(H100_8B, base_s=H100_8B.base_s * m, per_seq_s=H100_8B.per_seq_s * m,
                   per_context_token_s=H100_8B.per_context_token_s * m,
                   per_prefill_token_s=H100_8B.per_prefill_token_s * m,
                   kv_capacity_tokens=int(H100_8B.kv_capacity_tokens * scenario.kv_capacity))


def score(policies: list[dict], goal: float) -> dict:
    """The scenario's bars: a*, the cheapest online baseline and fixed fleet that reach it, and Tideserve's
    ratios to them."""
    by_name = {p["policy"]: p for p in policies}
    ours = by_name["tideserve"]
    baselines = [p for p in policies if p["policy"] not in ("tideserve", "hindsight")]
    target = min(goal, max(p["request_attainment"] for p in baselines)) - SLACK

    def cheapest(kinds: tuple[str, ...]) -> dict | None:
        reaching = [p for p in baselines if p["policy"].removesuffix("-tuned") in kinds
                    and p["request_attainment"] >= target]
        return min(reaching, key=lambda p: p["gpu_hours"]) if reaching else None

    online, fixed = cheapest(ONLINE), cheapest(FIXED)
    out = {"a_star": target, "tideserve_attainment": ours["request_attainment"],
           "tideserve_gpu_hours": ours["gpu_hours"], "reaches_a_star": ours["request_attainment"] >= target,
           "cheapest_online": online and online["policy"], "cheapest_fixed": fixed and fixed["policy"]}
    out["vs_online"] = ours["gpu_hours"] / online["gpu_hours"] if online else None
    out["vs_fixed"] = ours["gpu_hours"] / fixed["gpu_hours"] if fixed else None
    reference = [p for p in (online, fixed) if p]
    out["vs_cheapest"] = ours["gpu_hours"] / min(p["gpu_hours"] for p in reference) if reference else None
    if "hindsight" in by_name:
        out["vs_hindsight"] = ours["gpu_hours"] / by_name["hindsight"]["gpu_hours"]
    # 1e-3: runs of the same fleet end a few seconds apart (their last request finishes at another time).
    out["passes"] = bool(out["reaches_a_star"] and (out["vs_online"] is None or out["vs_online"] <= 1.001)
                         and (out["vs_fixed"] is None or out["vs_fixed"] <= 1.05))
    return out


def run_battery(args) -> int:
    from tideserve.sim.report import write_json

    shared = Path(args.shared) if args.shared else Path.cwd().parent / "shared"
    chosen = [s for s in SCENARIOS if s.quick or not args.quick]
    if args.scenarios:
        wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {s.name for s in chosen})
        if unknown or not wanted:
            print(f"--scenarios: no such battery scenario{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                  f"{' in the --quick subset' if args.quick else ''}; the scenarios: {', '.join(s.name for s in chosen)}",
                  file=sys.stderr)
            return 2
        chosen = [s for s in chosen if s.name in wanted]
    names = list(cli.POLICIES) + [n + cli.TUNED_SUFFIX for n in cli.POLICIES if n != "tideserve"]
    board, skipped, plots = [], [], []
    started = time.perf_counter()
    for scenario in chosen:
        try:
            arrays = workload(scenario, shared, seed=args.seed)
        except FileNotFoundError as exc:
            skipped.append({"scenario": scenario.name, "why": str(exc)})
            print(f"== {scenario.name}: skipped ({exc})", flush=True)
            continue
        run_args = copy.copy(args)
        run_args.startup_s, run_args.cold = scenario.startup_s, scenario.cold
        run_args.time_scale = scenario.time_scale
        try:
            run_args._deployment = cli.simulated_deployment(run_args)
        except ValueError as exc:
            print(f"invalid deployment: {exc}", file=sys.stderr)
            return 2
        print(f"== {scenario.name}: {scenario.what}", flush=True)
        scenario_names = names + (["hindsight"] if scenario.hindsight and not args.quick else [])
        payload, results = cli.evaluate(run_args, engine(scenario), arrays, scenario_names, scenario.name)
        payload["scenario"] = {**scenario.__dict__}
        payload["score"] = score(payload["policies"], run_args.attainment)
        print(f"  score: {json.dumps(payload['score'], default=float)}", flush=True)
        board.append(payload)
        plots.append((scenario.name, results))
    summary = _summary(board, time.perf_counter() - started)
    print(format_scoreboard(board, summary))
    if args.json:
        write_json(args.json, {"scenarios": board, "skipped": skipped, "summary": summary})
    if args.plot:
        plot_grid(plots, args.plot)
    return 0


def _summary(board: list[dict], seconds: float) -> dict:
    scores = [b["score"] for b in board]
    ratios = [s["vs_cheapest"] for s in scores if s["vs_cheapest"]]
    hindsight = [s["vs_hindsight"] for s in scores if s.get("vs_hindsight")]
    return {"scenarios": len(board), "passed": sum(s["passes"] for s in scores),
            "mean_vs_cheapest_baseline": float(np.mean(ratios)) if ratios else None,
            "mean_vs_hindsight": float(np.mean(hindsight)) if hindsight else None, "seconds": seconds}


def format_scoreboard(board: list[dict], summary: dict) -> str:
    header = (f"{'scenario':<22}{'a* %':>7}{'ours %':>8}{'ours GPU-h':>11}{'cheapest online':>22}{'x':>6}"
              f"{'cheapest fixed':>22}{'x':>6}{'infeas %':>9}{'pass':>6}")
    lines = ["", header, "-" * len(header)]
    for b in board:
        s = b["score"]
        infeasible = b["comparison"].get("infeasible_share")
        lines.append(
            f"{b['trace']:<22}{100 * s['a_star']:>7.2f}{100 * s['tideserve_attainment']:>8.2f}"
            f"{s['tideserve_gpu_hours']:>11.2f}{s['cheapest_online'] or '-':>22}"
            f"{_ratio(s['vs_online']):>6}{s['cheapest_fixed'] or '-':>22}{_ratio(s['vs_fixed']):>6}"
            f"{'' if infeasible is None else f'{100 * infeasible:.1f}':>9}{'yes' if s['passes'] else 'NO':>6}")
    lines.append(f"passed {summary['passed']} of {summary['scenarios']}; mean GPU-h vs the cheapest baseline "
                 f"reaching a*: {_ratio(summary['mean_vs_cheapest_baseline'])}; vs hindsight: "
                 f"{_ratio(summary['mean_vs_hindsight'])}; {summary['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_grid(plots: list[tuple[str, list]], path: str) -> None:
    """One panel per scenario: replicas over time for Tideserve and the untuned baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, math.ceil(len(plots) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, results) in zip(axes.flat, plots):
        for r in results:
            if r.policy.endswith("-tuned") or r.policy == "hindsight":
                continue
            tl = r.timeline
            ax.step(np.asarray(tl["time"]) / 3600, tl["gpus"], where="post", lw=1.4 if r.policy == "tideserve" else 0.8,
                    label=r.policy)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(plots):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.supxlabel("simulated hours")
    fig.supylabel("replicas (GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
