"""`tideserve simulate`: replay a trace against the Tideserve policy and the baselines in the same simulator."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from typing import NamedTuple

import numpy as np

from tideserve.router.balancer import POLICIES as POLICIES_ROUTER

POLICIES = ("tideserve", "static-peak", "static-mean", "hpa", "llm-d", "llm-d-goal", "dynamo", "kubeai")
# The hindsight bound's search: token budgets around the one whose busy step fits a 50 ms TPOT on an H100
# (512 to 1024 tokens) and the engine default, and bisections of the per-replica rate (0.5x to 2x the
# benchmark capacity, ~1% resolution after 8).
HINDSIGHT_TOKEN_BUDGETS = (512, 1024, 2048)
HINDSIGHT_BISECTIONS = 8
HINDSIGHT_SCAN = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace",
                        help="canonical CSV (arrival_s,input_tokens,output_tokens), an Azure 2023 CSV, or azure-conv / "
                             "azure-code; `tideserve trace` converts ServeGen")
    parser.add_argument("--policy", default=",".join(POLICIES), help=f"comma-separated, from: {', '.join(POLICIES)}")
    parser.add_argument("--json", help="write per-policy results here")
    parser.add_argument("--plot", help="write a PNG of replicas, latency and batch limit over time")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate (copies/thinning)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="compress time: 2 = twice as fast")
    parser.add_argument("--season-period", type=float, default=None,
                        help="seasonal period of the trace in (scaled) seconds; default: a day / time scale")
    parser.add_argument("--deployment", default=None,
                        help="the LLMDeployment YAML whose autoscaler is simulated, mapped as the operator maps it "
                             "(CRD defaults for every field it does not set); default: tideserve/data/"
                             "simulate-llmdeployment.yaml (8B on H100, 99%% of requests within TTFT 2 s and TPOT "
                             "50 ms, maxReplicas 64). The flags below override its fields")
    parser.add_argument("--ttft-ms", type=float, help="override spec.slo.ttft.targetMs")
    parser.add_argument("--tpot-ms", type=float, help="override spec.slo.tpot.targetMs")
    parser.add_argument("--percentile", type=float,
                        help="override both objectives' percentile (the SLO quantile of windows, and llm-d's)")
    parser.add_argument("--attainment", type=float,
                        help="override spec.slo.targetAttainment: the share of requests within both targets")
    parser.add_argument("--max-replicas", type=int, help="override spec.autoscaling.maxReplicas")
    parser.add_argument("--max-num-seqs", type=int, help="override spec.engine.maxNumSeqs (the engine's batch "
                        "limit at start, which every baseline keeps)")
    parser.add_argument("--startup-s", type=float, default=90.0,
                        help="the simulated replicas' cold start (the autoscaler learns it; until then it assumes "
                             "spec.seasonality.leadTimeSeconds)")
    parser.add_argument("--calibration",
                        help="JSON of the simulated engine's true step-time parameters (default: 8B model on an "
                             "H100); the autoscaler starts from its own bootstrap profile and calibrates online")
    parser.add_argument("--gpu-quota", type=int, help="replicas beyond this stay Pending")
    parser.add_argument("--router", choices=POLICIES_ROUTER, default=None,
                        help="the router's policy (default: prefix for traces with prefix blocks, e.g. Mooncake's "
                             "hash_ids, whose replicas then keep prefix caches; least-outstanding otherwise)")
    parser.add_argument("--kubeai-target", type=float, default=100.0, help="KubeAI targetRequests")
    parser.add_argument("--workers", type=int, default=min(2, multiprocessing.cpu_count()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuned", action="store_true",
                        help="also run every baseline on the static limits that benchmark best on this trace "
                             "(rows NAME-tuned)")
    parser.add_argument("--battery", action="store_true",
                        help="run the scenario battery (tideserve/sim/battery.py) instead of one trace; with --json "
                             "and --plot for the scoreboard; needs ../shared/traces (or --shared)")
    parser.add_argument("--quick", action="store_true", help="the battery's quick subset (implies --battery)")
    parser.add_argument("--scenarios", default=None,
                        help="only these battery scenarios, comma-separated (implies --battery; of the --quick subset "
                             "with --quick)")
    parser.add_argument("--shared", default=None, help="the folder holding traces/ for the battery (default: "
                                                       "../shared next to the working directory)")
    parser.add_argument("--hindsight", action="store_true",
                        help="also compute the hindsight bound: replicas scheduled from the trace's future arrivals "
                             "(a bound for the comparison, not a baseline; 32 extra simulations)")


DEFAULT_DEPLOYMENT = "simulate-llmdeployment.yaml"


def simulated_deployment(args) -> dict:
    """The LLMDeployment under simulation, defaulted and checked as the operator would, with the command line's
    overrides; fills args' targets from it (every policy is judged on the same ones). Raises ValueError."""
    import copy
    import importlib.resources

    from tideserve.local.deployment import DeploymentError, problems, read
    from tideserve.operator.resource import defaulted

    path = args.deployment or importlib.resources.files("tideserve.data").joinpath(DEFAULT_DEPLOYMENT)
    try:
        llmd = copy.deepcopy(read(path))
    except DeploymentError as exc:
        raise ValueError(str(exc)) from None
    spec = llmd["spec"]
    slo, autoscaling, engine = spec.setdefault("slo", {}), spec["autoscaling"], spec["engine"]
    for name, value in (("ttft", args.ttft_ms), ("tpot", args.tpot_ms)):
        if value is not None:
            slo.setdefault(name, {})["targetMs"] = value
    for name in ("ttft", "tpot"):
        if args.percentile is not None and name in slo:
            slo[name]["percentile"] = args.percentile
    for obj, key, value in ((slo, "targetAttainment", args.attainment), (autoscaling, "maxReplicas", args.max_replicas),
                            (engine, "maxNumSeqs", args.max_num_seqs)):
        if value is not None:
            obj[key] = value
    if autoscaling.get("mode", "off") == "off":
        autoscaling["mode"] = "active"  # simulating its autoscaler is the point
    llmd = defaulted(llmd)
    found = problems(llmd)
    if found:
        raise ValueError(f"{path} with the command line's overrides: " + "; ".join(found))
    spec = llmd["spec"]
    # What every policy is judged on, and the engine's starting limits (which the baselines keep).
    args.ttft_ms = spec["slo"]["ttft"]["targetMs"] if "ttft" in spec["slo"] else 60_000.0
    args.tpot_ms = spec["slo"]["tpot"]["targetMs"] if "tpot" in spec["slo"] else 2_000.0
    args.percentile = max(o["percentile"] for o in (spec["slo"].get("ttft"), spec["slo"].get("tpot")) if o)
    args.attainment = spec["slo"]["targetAttainment"]
    args.max_replicas = spec["autoscaling"]["maxReplicas"]
    args.max_num_seqs = spec["engine"]["maxNumSeqs"]
    args._max_num_batched_tokens = spec["engine"]["maxNumBatchedTokens"]
    return llmd


class Workload(NamedTuple):
    """One trace as arrays, and the requests' prefix block ids where the trace has them (Mooncake)."""
    arrivals: np.ndarray
    inputs: np.ndarray
    outputs: np.ndarray
    prefixes: list[tuple[int, ...] | None] | None = None

    @classmethod
    def of(cls, requests) -> "Workload":
        prefixes = [r.prefix_blocks for r in requests]
        return cls(np.array([r.arrival_s for r in requests]), np.array([r.input_tokens for r in requests]),
                   np.array([r.output_tokens for r in requests]), prefixes if any(prefixes) else None)


def _load_workload(args) -> Workload:
    from tideserve.traces import load_trace, scale_rate, scale_time

    requests = load_trace(args.trace)
    if args.rate_scale != 1.0:
        requests = scale_rate(requests, args.rate_scale, seed=args.seed)
    if args.time_scale != 1.0:
        requests = scale_time(requests, args.time_scale)
    return Workload.of(requests)


def _peak_and_mean(arrivals, inputs, outputs, window_s: float = 300.0):
    """The busiest 5-minute request rate, the mean rate, and the trace's mean length mix."""
    from tideserve.autoscaler.perf_model import QueryMix

    peak = np.bincount((arrivals // window_s).astype(int)).max() / window_s
    duration = max(arrivals[-1] - arrivals[0], window_s)
    return peak, len(arrivals) / duration, QueryMix(float(inputs.mean()), float(outputs.mean()))


def build_policy(name: str, args, params, workload):
    from tideserve.autoscaler.perf_model import BatchLimits, PerformanceModel
    from tideserve.autoscaler.policy import TideservePolicy
    from tideserve.autoscaler.spec import SEASON_SLOTS, policy_config
    from tideserve.sim import baselines as b

    ttft_s, tpot_s = args.ttft_ms / 1000, args.tpot_ms / 1000
    _, mean_rate, mean_mix = _peak_and_mean(*workload[:3])
    if name == "tideserve":
        # The shipped mapping and bootstrap, as in a cluster: never the simulated engine's own coefficients.
        config = policy_config(args._deployment["spec"])
        if args.season_period is not None or args.time_scale != 1.0:
            # Compressed time compresses the seasonal period too (below what the CRD allows a real one).
            config.season_period_s = args.season_period or config.season_period_s / args.time_scale
            config.season_slot_s = config.season_period_s / SEASON_SLOTS
        return TideservePolicy(config)
    if name == "static-peak":  # the replica count comes from _static_peak_search
        return b.StaticPolicy(name, args._static_peak)
    if name == "static-mean":
        return b.StaticPolicy(name, max(1, math.ceil(mean_rate / args._replica_capacity)))
    if name == "hpa":
        model = PerformanceModel(params)
        limits = BatchLimits(args.max_num_seqs, args._max_num_batched_tokens)
        capacity = model.capacity(mean_mix, tpot_s, ttft_s, limits).rate
        target = 0.7 * capacity * mean_mix.mean_output * model.step_time_at(0.7 * capacity, mean_mix)
        return b.HPAPolicy(max(1.0, target), max_replicas=args.max_replicas)
    if name == "llm-d":  # the recipe as published: P90 (the deployment's percentile where it names one)
        return b.LlmdSLOPolicy(ttft_s, tpot_s, max_replicas=args.max_replicas, percentile=args.percentile)
    if name == "llm-d-goal":  # the same rule on the attainment goal's quantile (p99 for a 99% goal)
        return b.LlmdSLOPolicy(ttft_s, tpot_s, max_replicas=args.max_replicas, percentile=100 * args.attainment,
                               name="llm-d-goal")
    if name == "dynamo":
        return b.DynamoPlannerPolicy(params, ttft_s, tpot_s, args.max_num_seqs, args._max_num_batched_tokens,
                                     max_replicas=args.max_replicas)
    if name == "kubeai":
        return b.KubeAIPolicy(args.kubeai_target, max_replicas=args.max_replicas)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def replica_capacity(args, params, workload, seconds: float = 600.0) -> float:
    """The request rate one replica sustains within the SLOs, measured the way operators size static fleets: a
    benchmark of one replica at a steady (Poisson) rate with the trace's length mix, raising the rate until the
    attainment goal is missed. Where even a light load misses the goal (the engine's default batch limits put a
    floor under the tail), the goal is what a light load attains, less 0.2 points."""
    from tideserve.sim.baselines import StaticPolicy
    from tideserve.sim.report import summarize
    from tideserve.sim.simulator import SimConfig, Simulation

    _, inputs, outputs, prefixes = workload
    rng = np.random.default_rng(args.seed)

    def attainment(rate: float) -> float:
        n = max(50, int(rate * seconds))
        arrivals = np.cumsum(rng.exponential(1 / rate, n))
        pick = rng.integers(0, len(inputs), n)
        result = Simulation(arrivals, inputs[pick], outputs[pick], StaticPolicy("static", 1), SimConfig(
            params=params, initial_replicas=1, initial_max_num_seqs=args.max_num_seqs,
            initial_max_num_batched_tokens=args._max_num_batched_tokens),
            prefixes=[prefixes[i] for i in pick] if prefixes is not None else None).run()
        return summarize(result, args.ttft_ms / 1000, args.tpot_ms / 1000)["request_attainment"]

    goal = min(args.attainment, attainment(0.2) - 0.002)
    lo, hi = 0.2, 64.0
    for _ in range(12):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if attainment(mid) >= goal else (lo, mid)
    return lo


def oracle_gpu_hours(arrivals: np.ndarray, capacity: float, window_s: float = 60.0) -> float:
    """A lower bound for any policy: every minute exactly the replicas its arrivals need at the one-replica
    benchmark capacity, started instantly and never idle. A policy cannot beat it by more than its replicas
    run hotter than the benchmark allowed."""
    counts = np.bincount(((arrivals - arrivals[0]) // window_s).astype(int))
    return float(np.ceil(counts / window_s / capacity).sum() * window_s / 3600)


def _simulate(policy, args, params, workload, initial: int, max_num_batched_tokens: int | None = None):
    from tideserve.sim.simulator import SimConfig, Simulation

    arrivals, inputs, outputs, prefixes = workload
    return Simulation(arrivals, inputs, outputs, policy, SimConfig(
        params=params, startup_s=args.startup_s, initial_replicas=initial, initial_max_num_seqs=args.max_num_seqs,
        initial_max_num_batched_tokens=max_num_batched_tokens or args._max_num_batched_tokens,
        gpu_quota=args.gpu_quota, router=getattr(args, "router", None)), prefixes=prefixes).run()


def _static_peak_search(args, params, workload):
    """Static at peak: the smallest fixed fleet that meets the attainment goal over the whole trace, i.e. a fleet
    provisioned so the SLO holds through the peaks. Bisection from the benchmark sizing of the peak 5 minutes
    upwards (half again at a time, then bisection); where no fleet up to --max-replicas meets the goal (the engine's default batch limits put a floor
    under the tail), the smallest one within 0.2 points of the largest fleet's attainment."""
    from tideserve.sim.baselines import StaticPolicy
    from tideserve.sim.report import summarize

    peak_rate, _, _ = _peak_and_mean(*workload[:3])
    runs: dict[int, tuple] = {}

    def run(n: int):
        if n not in runs:
            result = _simulate(StaticPolicy("static-peak", n), args, params, workload, n)
            runs[n] = (summarize(result, args.ttft_ms / 1000, args.tpot_ms / 1000, args.percentile), result)
        return runs[n]

    def attained(n: int) -> float:
        return run(n)[0]["request_attainment"]

    # Grow from the benchmark sizing by half each time until the goal is met, then bisect the last step; where
    # the benchmark sizing already meets it (bursts that the benchmark did not see are milder than it assumed),
    # walk down instead, so the fleet is the smallest that meets the goal either way.
    lo = hi = max(1, math.ceil(peak_rate / args._replica_capacity))
    goal = args.attainment
    while lo > 1 and attained(lo) >= goal and attained(lo - 1) >= goal:
        lo = hi = lo - 1
    while attained(hi) < goal:
        if hi >= args.max_replicas:
            goal = attained(hi) - 0.002
            break
        lo, hi = hi + 1, min(args.max_replicas, math.ceil(hi * 1.5))
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if attained(mid) >= goal else (mid + 1, hi)
    return run(lo)


def _hindsight_search(args, params, workload):
    """The hindsight bound: the cheapest run of HindsightPolicy that meets the attainment goal, over the
    per-replica rate (geometric bisection around the benchmark capacity) and the token budgets that matter
    for a busy step near the TPOT target; with no run meeting the goal, the one with the best attainment.
    Attainment is not exactly monotone in the rate (bursts meet the fleet in different phases), so beyond the
    best budget's bisection a few rates 1% apart are tried as well: a loose bound would flatter every policy."""
    from tideserve.sim.baselines import HindsightPolicy
    from tideserve.sim.report import summarize

    arrivals = workload[0]
    best = None

    def attempt(rate: float, budget: int) -> bool:
        nonlocal best
        policy = HindsightPolicy(arrivals, rate, args.startup_s, max_replicas=args.max_replicas)
        initial = max(1, math.ceil(policy.window_rate(arrivals[0]) / rate))
        result = _simulate(policy, args, params, workload, initial, max_num_batched_tokens=budget)
        summary = summarize(result, args.ttft_ms / 1000, args.tpot_ms / 1000, args.percentile)
        summary.update(hindsight_rate_per_replica=rate, hindsight_token_budget=budget)
        meets = summary["request_attainment"] >= args.attainment
        key = (meets, -summary["gpu_hours"] if meets else summary["request_attainment"])
        if best is None or key > best[0]:
            best = (key, summary, result)
        return meets

    for budget in HINDSIGHT_TOKEN_BUDGETS:
        lo, hi = 0.5 * args._replica_capacity, 2.0 * args._replica_capacity
        for _ in range(HINDSIGHT_BISECTIONS):
            rate = (lo * hi) ** 0.5
            lo, hi = (rate, hi) if attempt(rate, budget) else (lo, rate)
    rate, budget = best[1]["hindsight_rate_per_replica"], best[1]["hindsight_token_budget"]
    for step in range(1, HINDSIGHT_SCAN + 1):
        attempt(rate * 1.01**step, budget)
    return best[1], best[2]


TUNED_SUFFIX = "-tuned"
# The static limits a baseline may be tuned to: the hindsight bound's token budgets and vLLM's H100 default, with
# vLLM's two max_num_seqs defaults.
TUNED_GRID = tuple((seqs, budget) for budget in HINDSIGHT_TOKEN_BUDGETS + (8192,) for seqs in (256, 1024))


def _run_one(task):
    name, args, params, workload = task
    from tideserve.sim.report import summarize

    started = time.perf_counter()
    base = name.removesuffix(TUNED_SUFFIX)
    if base != name:  # the same baseline on the best static limits for this trace
        args = tuned_args(args)
    if base == "static-peak":
        summary, result = _static_peak_search(args, params, workload)
    elif base == "hindsight":
        summary, result = _hindsight_search(args, params, workload)
    else:
        arrivals = workload[0]
        if getattr(args, "cold", False):  # every policy starts at minReplicas
            initial = args._deployment["spec"]["autoscaling"]["minReplicas"]
        else:  # warm, with the replicas the first five minutes need at the benchmarked capacity
            first_rate = np.count_nonzero(arrivals < arrivals[0] + 300) / 300
            initial = max(1, math.ceil(first_rate / args._replica_capacity))
        result = _simulate(build_policy(base, args, params, workload), args, params, workload, max(1, initial))
        summary = summarize(result, args.ttft_ms / 1000, args.tpot_ms / 1000, args.percentile)
    summary["policy"] = name
    summary["sim_seconds"] = time.perf_counter() - started
    result.policy = name
    result.arrival = result.ttft = result.tpot = result.output_tokens = np.empty(0)  # keep the IPC small
    return summary, result


def tuned_args(args):
    """args with the engine's limits at the tuned ones (and the one-replica capacity measured there)."""
    import copy

    tuned = copy.copy(args)
    tuned.max_num_seqs, tuned._max_num_batched_tokens = args._tuned_limits
    tuned._replica_capacity = args._tuned_capacity
    return tuned


def tune_static_limits(args, params, workload) -> tuple[tuple[int, int], float]:
    """The static (max_num_seqs, token budget) that gives one replica the highest benchmarked SLO capacity on
    this trace's mix: what an operator tuning vLLM's flags by benchmark would pick (TUNED_GRID)."""
    import copy

    best = None
    for seqs, budget in TUNED_GRID:
        trial = copy.copy(args)
        trial.max_num_seqs, trial._max_num_batched_tokens = seqs, budget
        capacity = replica_capacity(trial, params, workload)
        if best is None or capacity > best[1]:
            best = ((seqs, budget), capacity)
    return best


def evaluate(args, params, workload, names: list[str], label: str) -> tuple[dict, list]:
    """Every policy on one workload: prints the table and the comparison, returns the JSON payload and the
    simulation results (for plots)."""
    from tideserve.sim.report import compare, format_table

    started = time.perf_counter()
    args._replica_capacity = replica_capacity(args, params, workload)
    if any(n.endswith(TUNED_SUFFIX) for n in names):
        args._tuned_limits, args._tuned_capacity = tune_static_limits(args, params, workload)
    # The searches run several simulations each: start them first so the pool packs the rest around them.
    order = sorted(names, key=lambda n: n.removesuffix(TUNED_SUFFIX) not in ("hindsight", "static-peak"))
    tasks = [(n, args, params, workload) for n in order]
    if args.workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("fork").Pool(min(args.workers, len(tasks))) as pool:
            outcomes = pool.map(_run_one, tasks, chunksize=1)
    else:
        outcomes = [_run_one(t) for t in tasks]
    outcomes.sort(key=lambda o: names.index(o[0]["policy"]))
    summaries = [s for s, _ in outcomes]
    print(f"trace {label}: {len(workload[0])} requests over {workload[0][-1] / 3600:.2f} h; SLO p{args.percentile:g} "
          f"TTFT <= {args.ttft_ms:g} ms, TPOT <= {args.tpot_ms:g} ms; simulated in {time.perf_counter() - started:.1f} s")
    print(format_table(summaries))
    verdict = compare(summaries, attainment_goal=args.attainment)
    verdict["replica_capacity_rps"] = args._replica_capacity
    if hasattr(args, "_tuned_limits"):
        verdict["tuned_limits"] = {"max_num_seqs": args._tuned_limits[0],
                                   "max_num_batched_tokens": args._tuned_limits[1],
                                   "replica_capacity_rps": args._tuned_capacity}
    verdict["infeasible_share"] = infeasible_share(args, params, workload)
    verdict["oracle_gpu_hours"] = oracle_gpu_hours(workload[0], args._replica_capacity)
    static_peak = next((s for s in summaries if s["policy"] == "static-peak"), None)
    if static_peak:
        verdict["oracle_vs_static_peak"] = verdict["oracle_gpu_hours"] / static_peak["gpu_hours"]
    hindsight = next((s for s in summaries if s["policy"] == "hindsight"), None)
    if hindsight:
        verdict["hindsight_meets_goal"] = hindsight["request_attainment"] >= args.attainment
        verdict["hindsight_gpu_hours"] = hindsight["gpu_hours"]
        for key, name in (("hindsight_vs_static_peak", "static-peak"),
                          ("hindsight_vs_cheapest_baseline", verdict.get("cheapest_baseline_with_same_attainment"))):
            peer = next((s for s in summaries if s["policy"] == name), None)
            if peer:
                verdict[key] = hindsight["gpu_hours"] / peer["gpu_hours"]
    for key, value in verdict.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    payload = {"trace": label, "requests": len(workload[0]), "args": {
        k: v for k, v in vars(args).items() if not k.startswith("_")}, "policies": summaries, "comparison": verdict}
    return payload, [r for _, r in outcomes]


def infeasible_share(args, params, workload, budget: int = 8192) -> float:
    """Share of requests whose own prefill on an idle replica of the true engine (largest token budget)
    outlasts the TTFT target: misses that no policy can avoid."""
    from tideserve.autoscaler.perf_model import BatchLimits, PerformanceModel

    longest = PerformanceModel(params).max_feasible_prompt(args.ttft_ms / 1000, BatchLimits(1, budget))
    return float(np.mean(workload[1] > longest))


def engine_params(args):
    """The simulated engine's true step-time parameters: --calibration, else the 8B-on-H100 profile."""
    from tideserve.autoscaler.perf_model import H100_8B, StepTimeParams

    if not args.calibration:
        return H100_8B
    with open(args.calibration) as f:
        return StepTimeParams.from_dict(json.load(f))


def run(args: argparse.Namespace) -> int:
    from tideserve.sim.report import plot, write_json

    if args.battery or args.quick or args.scenarios:
        from tideserve.sim.battery import run_battery

        return run_battery(args)
    if not args.trace:
        print("--trace is required (or --battery)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.policy.split(",") if n.strip()]
    if args.tuned:
        names += [n + TUNED_SUFFIX for n in names if n not in ("tideserve", "hindsight")]
    unknown = [n for n in names if n.removesuffix(TUNED_SUFFIX) not in POLICIES]
    if unknown or not names:
        print(f"unknown policy: {', '.join(unknown) or '(none)'}; choose from {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    try:
        params = engine_params(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"cannot read --calibration: {exc}", file=sys.stderr)
        return 2
    try:
        args._deployment = simulated_deployment(args)
    except ValueError as exc:
        print(f"invalid deployment: {exc}", file=sys.stderr)
        return 2
    try:
        workload = _load_workload(args)
    except (OSError, ValueError) as exc:
        print(f"cannot read trace: {exc}", file=sys.stderr)
        return 2
    if args.hindsight:
        names.append("hindsight")
    payload, results = evaluate(args, params, workload, names, args.trace)
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        plot(results, args.plot, args.ttft_ms / 1000, args.tpot_ms / 1000, title=args.trace)
    return 0
