"""`tideserve demo`: a local deployment of the demo model under a compressed real trace, autoscaled live.

The load replays request lengths of the Azure LLM inference trace 2023 (shipped with the package) in their
recorded order, on a rate that rises and falls over the run, with a query-mix change half way: the first
half takes conversation requests (longer outputs), the second half coding requests (long prompts, a few
output tokens), the shift from decode-heavy to prefill-heavy that the policy must re-plan for. Lengths are
scaled down so that a CPU serves them; the rate is relative to the capacity of one replica, measured by the
runtime's calibration on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import logging
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from tideserve.traces import TraceRequest, load_trace, scale_tokens

DEMO_YAML = "demo-llmdeployment.yaml"
PEAK_REPLICAS = 1.3  # the default peak, in replicas' worth of the calibrated capacity: two replicas serve it


@dataclass(frozen=True)
class DemoLoad:
    duration_s: float = 240.0
    base_rate: float = 0.3  # requests/s at the start and the end
    peak_rate: float = 3.0  # requests/s at the middle
    input_scale: float = 1 / 32  # Azure prompts average ~1,150 (conversation) and ~2,050 (code) tokens
    output_scale: float = 1 / 6
    max_input: int = 384
    max_output: int = 96
    seed: int = 0

    def rate_at(self, t: float) -> float:
        """Rises from base to peak at half time and falls back (a raised cosine): one compressed day."""
        return self.base_rate + (self.peak_rate - self.base_rate) * math.sin(math.pi * t / self.duration_s) ** 2


def build_workload(load: DemoLoad) -> list[TraceRequest]:
    """Arrivals of an inhomogeneous Poisson process at load.rate_at(t) (by thinning); lengths taken in order
    from the conversation trace before half time and from the code trace after it."""
    if not (0 < load.base_rate <= load.peak_rate and load.duration_s > 0):
        raise ValueError("need 0 < base_rate <= peak_rate and a positive duration")
    rng = np.random.default_rng(load.seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / load.peak_rate)
        if t >= load.duration_s:
            break
        if rng.random() < load.rate_at(t) / load.peak_rate:
            arrivals.append(t)
    mixes = {name: scale_tokens(load_trace(name), load.input_scale, load.output_scale, load.max_input,
                                load.max_output) for name in ("azure-conv", "azure-code")}
    workload, used = [], {"azure-conv": 0, "azure-code": 0}
    for arrival in arrivals:
        name = "azure-conv" if arrival < load.duration_s / 2 else "azure-code"
        source = mixes[name][used[name] % len(mixes[name])]
        used[name] += 1
        workload.append(TraceRequest(arrival, source.input_tokens, max(2, source.output_tokens)))
    return workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", help="LLMDeployment YAML to run (default: the built-in demo deployment)")
    parser.add_argument("--duration", type=float, default=DemoLoad.duration_s, help="seconds of load (default: %(default)s)")
    parser.add_argument("--peak-rate", type=float, help="requests/s at the peak (default: 1.3 replicas' capacity, "
                        "from the calibration)")
    parser.add_argument("--base-rate", type=float, help="requests/s at the start and end (default: peak / 10)")
    parser.add_argument("--port", type=int, default=8000, help="the deployment's endpoint (default: %(default)s)")
    parser.add_argument("--plot", default="tideserve-demo.png", help="PNG written at the end (default: %(default)s)")
    parser.add_argument("--json", help="also write the timeline and the load's results to this JSON file")
    parser.add_argument("--prometheus", metavar="PNG", nargs="?", const="tideserve-dashboard.png",
                        help="also run a local Prometheus (tideserve up --prometheus) and draw the shipped Grafana "
                             "dashboard's panels from it at the end (default PNG: %(const)s)")
    parser.add_argument("--log-dir", help="worker logs go here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from tideserve.local.deployment import DeploymentError, load
    from tideserve.local.runtime import LocalRuntimeError

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.file:
            llmd = load(args.file)
        else:
            with importlib.resources.as_file(importlib.resources.files("tideserve") / "data" / DEMO_YAML) as path:
                llmd = load(path)
    except DeploymentError as exc:
        print(f"tideserve demo: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_demo(llmd, args))
    except (LocalRuntimeError, OSError, ValueError) as exc:
        print(f"tideserve demo: {exc}", file=sys.stderr)
        return 1
    return 0 if result["failed"] == 0 else 1


async def run_demo(llmd: dict, args: argparse.Namespace) -> dict:
    from tideserve.bench.loadgen import BenchConfig, run_benchmark
    from tideserve.local.runtime import LocalRuntime
    from tideserve.local.view import LiveView, plot_timeline

    spec = llmd["spec"]
    view = LiveView(f"tideserve demo: {spec['model']['name']} at http://127.0.0.1:{args.port}/v1 "
                    f"(replicas {spec['autoscaling']['minReplicas']}..{spec['autoscaling']['maxReplicas']})")
    runtime = LocalRuntime(llmd, port=args.port, log_dir=args.log_dir, on_decision=lambda _, p: view.update(p),
                           prometheus=bool(args.prometheus), scrape_interval_s=2.0)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runtime.run(stop))
    print(f"starting {spec['model']['name']} and measuring one replica on this machine...", flush=True)
    started = asyncio.ensure_future(runtime.started.wait())
    await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        started.cancel()
        serving.result()  # raises what stopped it
    one_replica = single_replica_rate(runtime)
    peak = args.peak_rate or round(PEAK_REPLICAS * one_replica, 2)
    demo_load = DemoLoad(duration_s=args.duration, peak_rate=peak, base_rate=args.base_rate or peak / 10,
                         seed=args.seed)
    workload = build_workload(demo_load)
    p = runtime.profile
    view.set_status(f"measured: step = {p.base_s * 1e3:.0f} ms + {p.per_seq_s * 1e3:.1f} ms/sequence + "
                    f"{p.per_prefill_token_s * 1e3:.2f} ms/prompt token; one replica ~{one_replica:.2f} req/s at the "
                    f"SLO. load: {len(workload)} requests over {args.duration:.0f} s, {demo_load.base_rate:.2f} -> "
                    f"{peak:.2f} -> {demo_load.base_rate:.2f} req/s; conversation mix, then code mix at "
                    f"{args.duration / 2:.0f} s")
    slo = spec["slo"]
    ttft_ms = slo.get("ttft", {}).get("targetMs")
    tpot_ms = slo.get("tpot", {}).get("targetMs")
    load_start = time.time()
    try:
        bench = await run_benchmark(BenchConfig(base_url=runtime.url, workload=workload, model=spec["model"]["name"],
                                                slo_ttft_ms=ttft_ms, slo_tpot_ms=tpot_ms, seed=args.seed,
                                                label="demo"))
        # After the load, idle until the deployment is back at its minimum (or long enough that it should be).
        c = runtime.config
        view.set_status("load done; waiting for the scale-down")
        deadline = time.monotonic() + c.scale_down_stabilization_s + c.scale_down_period_s * c.max_replicas \
            + 3 * c.interval_s
        while runtime.desired > c.min_replicas and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        await asyncio.sleep(c.interval_s)
        if runtime.prometheus is not None:
            await asyncio.to_thread(_draw_dashboard, runtime, args.prometheus, load_start - 30)
    finally:
        stop.set()
        await serving
    s = bench.summary
    good = s.goodput * s.duration_s if s.goodput is not None else None
    offered = [(load_start + t, demo_load.rate_at(t)) for t in np.linspace(0, args.duration, 200)]
    plot_timeline(runtime.timeline, args.plot, f"tideserve demo: {spec['model']['name']}, "
                  f"{len(workload)} requests", (ttft_ms or 6e4) / 1000, (tpot_ms or 2e3) / 1000, offered)
    result = {
        "requests": len(workload), "completed": s.completed, "failed": s.failed, "errors": s.errors,
        "slo_attainment": None if good is None or not s.completed else good / len(workload),
        "ttft_p90_ms": s.ttft.p90_ms, "tpot_p90_ms": s.tpot.p90_ms,
        "max_replicas": max(p.desired for p in runtime.timeline),
        "batch_limits": sorted({(p.max_num_seqs, p.max_num_batched_tokens) for p in runtime.timeline}),
        "scaling_actions": sum(1 for d in runtime.decisions if d.action in ("scale-up", "scale-down")),
        "drained": runtime.retired,
        "router_retries": runtime.router.retried,
        "profile": runtime.profile.to_dict() if runtime.profile else None,
        "profile_at_end": runtime.policy.model.params.to_dict(),
        "one_replica_rate": one_replica, "peak_rate": peak,
    }
    print(f"\n{s.completed}/{len(workload)} requests completed, {s.failed} failed; "
          f"SLO attainment {100 * (result['slo_attainment'] or 0):.1f}% (TTFT <= {ttft_ms} ms and TPOT <= "
          f"{tpot_ms} ms); TTFT p90 {s.ttft.p90_ms or 0:.0f} ms, TPOT p90 {s.tpot.p90_ms or 0:.0f} ms; "
          f"up to {result['max_replicas']} replicas, {result['scaling_actions']} scaling actions, batch limits "
          f"used {result['batch_limits']}; plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "timeline": [vars(p) for p in runtime.timeline],
                       "load": bench.to_dict()["summary"]}, f, indent=1, default=str)
    return result


def _draw_dashboard(runtime, out: str, start: float) -> None:
    from tideserve.monitoring import dashboard

    end = time.time()
    counts = dashboard.render(runtime.prometheus.api, dashboard.load(),
                              {"namespace": runtime.namespace, "llmdeployment": runtime.name}, start, end, out,
                              step_s=max(2.0, (end - start) / 300), rate_interval="30s")
    print(f"dashboard: {out} ({sum(1 for n in counts.values() if n)} of {len(counts)} panels with data)", flush=True)


def single_replica_rate(runtime) -> float:
    """What one replica sustains under the conversation mix at the SLO, from the calibrated model."""
    from tideserve.autoscaler.perf_model import QueryMix

    policy = runtime.policy
    c = policy.config
    demo = DemoLoad()
    mix = QueryMix(1155 * demo.input_scale, 211 * demo.output_scale)  # the conversation trace's means
    _, capacity = policy.model.choose_limits(mix, c.tpot.target_s, c.ttft.target_s, policy.tpot_tail,
                                             policy.ttft_tail)
    return max(capacity.rate, 0.05)
