"""Each baseline's rule, pinned to ../shared/reference/autoscaling-baselines.md (the numbers in the comments are
that document's): the simulator's comparisons are only as fair as these formulas are faithful."""

from __future__ import annotations

import math

from tideserve.autoscaler.observation import Observation
from tideserve.autoscaler.perf_model import H100_8B, BatchLimits, PerformanceModel, QueryMix
from tideserve.autoscaler.slo import Histogram
from tideserve.buckets import TOKEN_COUNT_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from tideserve.sim.baselines import DynamoPlannerPolicy, HPAPolicy, KubeAIPolicy, LlmdSLOPolicy

TTFT_EDGES = tuple(TTFT_BUCKETS) + (math.inf,)
TPOT_EDGES = tuple(TPOT_BUCKETS) + (math.inf,)
TOKEN_EDGES = tuple(TOKEN_COUNT_BUCKETS) + (math.inf,)


def obs(t, n=4, ready=None, running=0.0, waiting=0.0, ttft=None, tpot=None, finished=0, mean_in=1000, mean_out=200,
        window_s=15.0):
    return Observation(time=t, window_s=window_s, desired_replicas=n, ready_replicas=n if ready is None else ready,
                       pending_replicas=0, max_num_seqs=256, max_num_batched_tokens=2048, running=running,
                       waiting=waiting, requests_finished=float(finished),
                       ttft=None if ttft is None else Histogram.from_values(TTFT_EDGES, ttft),
                       tpot=None if tpot is None else Histogram.from_values(TPOT_EDGES, tpot),
                       prompt_tokens=Histogram.from_values(TOKEN_EDGES, [mean_in] * max(finished, 1)),
                       generation_tokens=Histogram.from_values(TOKEN_EDGES, [mean_out] * max(finished, 1)))


def test_hpa_is_ceil_n_times_metric_over_target_outside_a_10_percent_tolerance():
    hpa = HPAPolicy(target_running=10, max_replicas=64)
    assert hpa.decide(obs(0, n=4, running=4 * 10.9)).replicas == 4  # ratio 1.09: inside the tolerance
    assert hpa.decide(obs(15, n=4, running=4 * 11.5)).replicas == math.ceil(4 * 1.15)  # 5
    assert hpa.decide(obs(30, n=4, running=4 * 25)).replicas == 10


def test_hpa_scales_down_to_the_highest_recommendation_of_its_300_s_window():
    hpa = HPAPolicy(target_running=10)
    assert hpa.decide(obs(0, n=4, running=80)).replicas == 8
    assert hpa.decide(obs(15, n=8, running=8)).replicas == 8  # lower now, but 8 was asked within 300 s
    assert hpa.decide(obs(320, n=8, running=8)).replicas == 1  # the window has moved on


def test_llm_d_scales_up_by_n_times_s_c_over_0_55_minus_1_at_most_max_100_percent_or_4_per_minute():
    llmd = LlmdSLOPolicy(ttft_slo_s=2.0, tpot_slo_s=0.05, max_replicas=64)
    # s = p90 TTFT / 2 s (TPOT's is lower), the p90 as Prometheus interpolates it in its bucket: 0.88 here.
    s = Histogram.from_values(TTFT_EDGES, [1.6] * 100).quantile(0.9) / 2.0
    assert 0.55 < s < 1.0
    d = llmd.decide(obs(0, n=4, ttft=[1.6] * 100, tpot=[0.01] * 100))
    assert d.replicas == 4 + math.ceil(4 * (s / 0.55 - 1))
    assert llmd.decide(obs(30, n=6, ttft=[1.6] * 100, tpot=[0.01] * 100)).replicas == 6  # once per 60 s
    # s clamps at 2; the step at max(100%, 4): from 2 replicas at most +4.
    big = LlmdSLOPolicy(ttft_slo_s=2.0, tpot_slo_s=0.05, max_replicas=64)
    assert big.decide(obs(0, n=2, ttft=[30.0] * 100)).replicas == 2 + 4
    # c = ready / provisioned: replicas still starting damp the step.
    credit = LlmdSLOPolicy(ttft_slo_s=2.0, tpot_slo_s=0.05, max_replicas=64)
    credit_s = Histogram.from_values(TTFT_EDGES, [2.0] * 100).quantile(0.9) / 2.0
    expected = 4 + math.ceil(4 * (credit_s * 0.5 / 0.55 - 1))
    assert credit_s * 0.5 > 0.55 and credit.decide(obs(0, n=4, ready=2, ttft=[2.0] * 100)).replicas == expected


def test_llm_d_scales_down_one_pod_per_two_minutes_below_0_40():
    llmd = LlmdSLOPolicy(ttft_slo_s=2.0, tpot_slo_s=0.05)
    assert llmd.decide(obs(0, n=6, ttft=[0.2] * 100, tpot=[0.005] * 100)).replicas == 5  # s = 0.1: one pod
    assert llmd.decide(obs(60, n=5, ttft=[0.2] * 100, tpot=[0.005] * 100)).replicas == 5  # within 120 s
    assert llmd.decide(obs(121, n=5, ttft=[0.2] * 100, tpot=[0.005] * 100)).replicas == 4


def test_llm_d_reads_the_percentile_it_is_given():
    """The published recipe reads P90; the goal's quantile (p99 for 99%) sees the slow tenth."""
    ttft = [0.2] * 95 + [3.0] * 5
    assert LlmdSLOPolicy(2.0, 0.05).decide(obs(0, n=4, ttft=ttft)).replicas < 4  # p90 0.2 s: down
    assert LlmdSLOPolicy(2.0, 0.05, percentile=99).decide(obs(0, n=4, ttft=ttft)).replicas > 4  # p99 3 s: up


def test_dynamo_sets_demand_over_the_profiled_capacity_on_means_every_180_s():
    dynamo = DynamoPlannerPolicy(H100_8B, 2.0, 0.05, max_num_seqs=1024, max_num_batched_tokens=8192, max_replicas=64)
    assert dynamo.interval_s == 180.0
    d = dynamo.decide(obs(180, n=1, finished=180 * 20, mean_in=1000, mean_out=200, window_s=180.0))
    capacity = PerformanceModel(H100_8B).capacity(QueryMix(1000, 200), 0.05, 2.0, BatchLimits(1024, 8192)).rate
    assert d.replicas == math.ceil(20.0 / capacity)  # the first forecast is the observation itself


def test_kubeai_is_ceil_of_a_ten_minute_average_of_active_requests_over_the_target():
    kubeai = KubeAIPolicy(target_requests=100, max_replicas=64)
    assert kubeai.interval_s == 10.0 and kubeai.samples.maxlen == 60
    assert kubeai.decide(obs(0, n=1, running=250)).replicas == 3
    # Averaged, not instant: one quiet sample barely moves it, and scale-down waits 30 s of lower decisions.
    assert kubeai.decide(obs(10, n=3, running=0)).replicas == 3
    for t in range(20, 400, 10):
        d = kubeai.decide(obs(t, n=3, running=0))
    assert d.replicas == 1
