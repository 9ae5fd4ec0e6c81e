"""The simulator, the ServeGen converter and the `tideserve simulate` / `tideserve trace` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tideserve.autoscaler.perf_model import H100_8B
from tideserve.cli import main
from tideserve.sim.baselines import HindsightPolicy, StaticPolicy
from tideserve.sim.simulator import SimConfig, Simulation
from tideserve.traces import load_trace


def run_static(arrivals, inputs, outputs, replicas=1, **config):
    policy = StaticPolicy("static", replicas)
    return Simulation(np.asarray(arrivals, float), np.asarray(inputs), np.asarray(outputs), policy,
                      SimConfig(initial_replicas=replicas, **config)).run()


def test_one_request_alone_follows_the_step_model():
    p = H100_8B
    result = run_static([0.0], [1000], [11])
    prefill_step = p.step_time(0, 0, 1000)
    assert result.ttft[0] == pytest.approx(prefill_step)
    decode_steps = [p.step_time(1, 1001 + k, 0) for k in range(10)]
    # The context grows by one token per step; the simulator keeps it piecewise constant between events.
    assert result.tpot[0] == pytest.approx(np.mean(decode_steps), rel=0.01)


def test_every_request_finishes_and_gpu_time_is_accounted():
    rng = np.random.default_rng(0)
    n = 2000
    arrivals = np.cumsum(rng.exponential(1 / 8.0, n))
    result = run_static(arrivals, rng.integers(10, 3000, n), rng.integers(1, 500, n), replicas=2)
    assert len(result.ttft) == n and np.all(result.ttft > 0) and np.all(result.tpot >= 0)
    assert result.gpu_seconds == pytest.approx(2 * result.duration_s)


def test_overload_queues_and_a_lower_batch_limit_protects_tpot():
    rng = np.random.default_rng(1)
    n = 3000
    arrivals = np.cumsum(rng.exponential(1 / 30.0, n))  # about three times what one replica carries
    inputs, outputs = rng.integers(500, 1500, n), rng.integers(100, 300, n)
    open_batch = run_static(arrivals, inputs, outputs)
    capped = run_static(arrivals, inputs, outputs, initial_max_num_seqs=32, initial_max_num_batched_tokens=512)
    assert np.percentile(capped.tpot, 99) < np.percentile(open_batch.tpot, 99)
    assert np.percentile(capped.ttft, 50) > np.percentile(open_batch.ttft, 50)  # the excess waits instead


def test_servegen_extract_synthesizes_a_day():
    from tideserve.sim import servegen

    data = servegen.load_extract("m-large")
    day = servegen.synthesize(data, rate_scale=0.0005, days=1, seed=0)
    arrivals = np.array([r.arrival_s for r in day])
    assert 5_000 < len(day) < 50_000
    assert np.all(np.diff(arrivals) >= 0) and arrivals[-1] < 86400
    assert all(1 <= r.input_tokens and 1 <= r.output_tokens and r.input_tokens + r.output_tokens <= 8192
               for r in day)
    compressed = servegen.synthesize(data, rate_scale=0.0005, time_scale=24, days=1, seed=0)
    assert len(compressed) == len(day) and compressed[-1].arrival_s < 3600
    with pytest.raises(ValueError, match="shipped"):
        servegen.load_extract("m-nonexistent")


def test_trace_and_simulate_commands(tmp_path, capsys):
    trace = tmp_path / "azure.csv"
    assert main(["trace", "azure", "--rate-scale", "3", "--out", str(trace)]) == 0
    requests = load_trace(trace)
    head = [r for r in requests if r.arrival_s < 240]
    short = tmp_path / "short.csv"
    short.write_text("arrival_s,input_tokens,output_tokens\n" +
                     "".join(f"{r.arrival_s},{r.input_tokens},{r.output_tokens}\n" for r in head))
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["simulate", "--trace", str(short), "--json", str(out_json), "--plot", str(out_png),
                 "--season-period", "600", "--startup-s", "30", "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads(out_json.read_text())
    names = [p["policy"] for p in results["policies"]]
    assert names == ["tideserve", "static-peak", "static-mean", "hpa", "llm-d", "llm-d-goal", "dynamo", "kubeai"]
    for p in results["policies"]:
        assert 0 <= p["request_attainment"] <= 1 and p["gpu_hours"] > 0
        assert p["requests"] == len(head)
        assert p["policy"] in printed
    comparison = results["comparison"]
    assert "gpu_hours_vs_static_peak" in comparison and comparison["replica_capacity_rps"] > 0
    assert 0 < comparison["oracle_gpu_hours"] < max(p["gpu_hours"] for p in results["policies"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hindsight_schedules_replicas_one_start_up_ahead_of_their_load():
    # 2 req/s for 600 s, then 10 req/s for 600 s; 2 req/s per replica, start-up 90 s.
    arrivals = np.concatenate([np.arange(0, 600, 0.5), np.arange(600, 1200, 0.1)])
    policy = HindsightPolicy(arrivals, rate_per_replica=2.0, startup_s=90.0)
    sim = Simulation(arrivals, np.full(len(arrivals), 100), np.full(len(arrivals), 10), policy,
                     SimConfig(initial_replicas=1, startup_s=90.0))
    timeline = sim.run().timeline
    desired = dict(zip(timeline["time"], timeline["desired"]))
    assert desired[420.0] == 1  # the step is more than a start-up and an interval away
    assert desired[510.0] == 5  # asked for a start-up ahead: ready when the step arrives
    assert min(d for t, d in desired.items() if 600 <= t < 1100) == 5
    # The last minute of the trace is averaged over what is left of it, not over a full minute.
    assert policy.window_rate(1190.0) == pytest.approx(10.0)


def test_simulate_hindsight_bound_and_smallest_static_fleet(tmp_path, capsys):
    trace = tmp_path / "steady.csv"
    rng = np.random.default_rng(1)
    arrivals = np.cumsum(rng.exponential(1 / 30.0, 9000))  # 30 req/s for 5 minutes
    trace.write_text("arrival_s,input_tokens,output_tokens\n" + "".join(f"{t:.4f},600,120\n" for t in arrivals))
    out_json = tmp_path / "r.json"
    assert main(["simulate", "--trace", str(trace), "--policy", "static-peak,llm-d", "--hindsight",
                 "--json", str(out_json), "--startup-s", "30", "--workers", "1"]) == 0
    results = json.loads(out_json.read_text())
    by_name = {p["policy"]: p for p in results["policies"]}
    assert list(by_name) == ["static-peak", "llm-d", "hindsight"]
    comparison = results["comparison"]
    # A bound is reported beside the baselines, never taken for one.
    assert comparison.get("cheapest_baseline_with_same_attainment") != "hindsight"
    assert comparison["hindsight_gpu_hours"] == pytest.approx(by_name["hindsight"]["gpu_hours"])
    assert comparison["hindsight_meets_goal"] == (by_name["hindsight"]["request_attainment"] >= 0.99)
    # Static at peak is the smallest fixed fleet that meets the goal: one replica fewer misses it.
    peak = round(by_name["static-peak"]["mean_replicas"])
    assert by_name["static-peak"]["request_attainment"] >= 0.99
    fewer = Simulation(arrivals, np.full(len(arrivals), 600), np.full(len(arrivals), 120),
                       StaticPolicy("static", peak - 1), SimConfig(initial_replicas=peak - 1)).run()
    assert ((fewer.ttft <= 2.0) & (fewer.tpot <= 0.05)).mean() < 0.99


def test_simulate_rejects_bad_input(tmp_path, capsys):
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read trace" in capsys.readouterr().err
    assert main(["simulate", "--trace", "azure-conv", "--policy", "tideserve,magic"]) == 2
    assert "unknown policy: magic" in capsys.readouterr().err
    assert main(["simulate", "--scenarios", "cold-ramp,azure-conv-x7"]) == 2
    assert "no such battery scenario azure-conv-x7; the scenarios: servegen-m-large-14d," in capsys.readouterr().err
    assert main(["simulate", "--quick", "--scenarios", "startup-30s"]) == 2  # not in the quick subset
    assert "no such battery scenario startup-30s in the --quick subset" in capsys.readouterr().err


def test_a_cached_prefix_is_not_prefilled_again_and_blocks_still_prefilling_are_not_shared():
    p = H100_8B
    shared = (1, 2, 3, 4)  # four 512-token blocks
    prefixes = [shared + (10,), shared + (11,), shared + (12,)]
    # The second arrives while the first prefills (nothing to share yet); the third after both finished.
    result = Simulation(np.array([0.0, 0.001, 5.0]), np.array([2100, 2100, 2100]), np.array([2, 2, 2]),
                        StaticPolicy("static", 1), SimConfig(initial_replicas=1, initial_max_num_batched_tokens=4096),
                        prefixes=prefixes).run()
    assert result.ttft[2] == pytest.approx(p.step_time(0, 0, 2100 - 4 * 512), rel=1e-6)
    assert result.prefix_cache_hit_rate == pytest.approx(4 * 512 / (3 * 2100))
    without = Simulation(np.array([0.0, 0.001, 5.0]), np.array([2100, 2100, 2100]), np.array([2, 2, 2]),
                         StaticPolicy("static", 1), SimConfig(initial_replicas=1, initial_max_num_batched_tokens=4096)).run()
    assert without.prefix_cache_hit_rate == 0.0 and without.ttft[2] == pytest.approx(p.step_time(0, 0, 2100), rel=1e-6)


def test_prefix_routing_keeps_conversations_on_the_replica_that_holds_them():
    from dataclasses import replace

    rng = np.random.default_rng(1)
    n = 600
    conversation = rng.integers(0, 20, n)  # 20 conversations, each a long shared history of 8 blocks
    prefixes = [tuple(1000 * c + b for b in range(8)) + (10**6 + i,) for i, c in enumerate(conversation)]
    arrivals = np.cumsum(rng.exponential(1 / 6.0, n))
    inputs, outputs = np.full(n, 8 * 512 + 100), np.full(n, 20)
    # Each replica's KV cache holds about six histories: all twenty fit only when each replica keeps its own.
    params = replace(H100_8B, kv_capacity_tokens=6 * 8 * 512)
    runs = {router: Simulation(arrivals, inputs, outputs, StaticPolicy("static", 4),
                               SimConfig(params=params, initial_replicas=4, router=router), prefixes=prefixes).run()
            for router in ("prefix", "least-outstanding", "round-robin")}
    hit = {k: r.prefix_cache_hit_rate for k, r in runs.items()}
    assert hit["prefix"] > 0.7 and hit["least-outstanding"] < 0.4 and hit["round-robin"] < 0.4, hit
    for other in ("least-outstanding", "round-robin"):
        assert np.percentile(runs["prefix"].ttft, 50) < np.percentile(runs[other].ttft, 50)
        assert runs["prefix"].ttft.mean() < 0.5 * runs[other].ttft.mean()


def test_a_router_holding_requests_at_zero_replicas_lets_the_policy_start_the_first_one():
    from tideserve.autoscaler.policy import PolicyConfig, TideservePolicy
    from tideserve.autoscaler.slo import PercentileSLO

    policy = TideservePolicy(PolicyConfig(min_replicas=0, max_replicas=4, interval_s=5, ttft=PercentileSLO(90, 2.0),
                                          scale_to_zero_after_s=60))
    arrivals = np.array([30.0, 31.0, 400.0])
    result = Simulation(arrivals, np.full(3, 200), np.full(3, 20), policy,
                        SimConfig(initial_replicas=0, startup_s=20.0)).run()
    assert len(result.ttft) == 3 and np.all(np.isfinite(result.ttft))
    # Started by the held request (its TTFT includes the start-up), back to zero when idle, started again.
    assert 20.0 < result.ttft[0] < 30.0
    gpus = result.timeline["gpus"]
    assert gpus[0] == 0 and gpus.max() >= 1 and (gpus == 0).sum() > 2
    assert result.reasons.get("scale-up", 0) >= 2 and result.reasons.get("scale-down", 0) >= 1
