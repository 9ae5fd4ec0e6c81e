"""The pure parts of the cluster's autoscaling loop: pods and Prometheus results to snapshots, the collectors
(over httpx's mock transport), status and events, the persisted state and its size bound, peering, and the
reconcile/loop status merge."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import random
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tideserve.autoscaler.control_loop import pending_count
from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.perf_model import H100_8B
from tideserve.autoscaler.policy import TideservePolicy
from tideserve.autoscaler.scrape import ReplicaSample, WindowAggregator, parse_exposition
from tideserve.autoscaler.spec import policy_config
from tideserve.buckets import TPOT_BUCKETS, TTFT_BUCKETS
from tideserve.operator import autoscaler_state, autoscaler_status as loop_status, metrics_source as source
from tideserve.operator import reconcile, status
from tideserve.operator.autoscaler_loop import peering_allows, replace_patch
from tideserve.operator.autoscaler_metrics import AutoscalerMetrics
from tideserve.operator.manifests import OperatorConfig
from tideserve.operator.resource import defaulted, schema_errors
from tideserve.worker.metrics import EngineMetrics

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
T = NOW.timestamp()


def llmd(mode="active", kind="tideserve", **autoscaling) -> dict:
    with open("examples/minimal.yaml") as f:
        obj = yaml.safe_load(f)
    obj["metadata"].update(namespace="default", uid="uid-1", generation=2, resourceVersion="7")
    obj["spec"]["engine"] = {"kind": kind, "maxNumSeqs": 256, "maxNumBatchedTokens": 8192}
    if kind == "vllm":
        obj["spec"]["resources"]["gpus"] = 1
    obj["spec"]["autoscaling"] = {"mode": mode, "intervalSeconds": 15, **autoscaling}
    obj["spec"]["slo"] = {"ttft": {"targetMs": 2000}, "tpot": {"targetMs": 50}}
    return defaulted(obj)


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name="p", ready=True, ip="10.0.0.7", created=T - 300, ready_at=T - 10, unschedulable=False, deleting=False,
        annotations=None, admin_port=8001) -> dict:
    conditions = []
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable"})
    conditions.append({"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": iso(ready_at)})
    meta = {"name": name, "creationTimestamp": iso(created), "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = iso(T)
    return {"metadata": meta,
            "spec": {"containers": [{"name": "worker", "ports": [{"name": "http", "containerPort": 8000},
                                                                 {"name": "admin", "containerPort": admin_port}]}]},
            "status": {"podIP": ip, "conditions": conditions, "phase": "Running" if ready else "Pending",
                       "containerStatuses": [{"name": "worker", "state": {"running": {"startedAt": iso(created + 20)}}}]}}


def worker_metrics(requests=50, ttft=0.4, tpot=0.02, limits=(64, 2048)) -> EngineMetrics:
    m = EngineMetrics("m")
    for _ in range(requests):
        m.ttft.observe(ttft)
        m.tpot.observe(tpot)
        m.itl.observe(tpot)
        m.e2e.observe(ttft + 50 * tpot)
        m.prompt_len.observe(300)
        m.output_len.observe(50)
    m.running.set(3)
    m.max_num_seqs.set(limits[0])
    m.max_num_batched_tokens.set(limits[1])
    m.request_finished("stop")
    return m


# --- pods ------------------------------------------------------------------------------------------------------


def test_pod_readiness_start_and_pending():
    assert source.is_ready(pod()) and not source.is_ready(pod(ip="")) and not source.is_ready(pod(deleting=True))
    assert source.started_at(pod(created=T - 300)) == T - 280  # the worker container's start
    fresh = pod("new", ready=False, created=T - 60)
    overdue = pod("slow", ready=False, created=T - 2000)
    waiting = pod("gpu", ready=False, created=T - 5, unschedulable=True)
    going = pod("old", ready=False, created=T - 5000, deleting=True)
    live = [p for p in (pod(), fresh, overdue, waiting, going) if not source.is_terminating(p)]
    assert pending_count([source.replica_view(p, T, None) for p in live], expected_startup_s=600) == 2
    assert source.newest_startup_s([pod("a", created=T - 300, ready_at=T - 100), pod("b", created=T - 90, ready_at=T - 30)],
                                   since=T - 50) == 60
    assert source.newest_startup_s([pod("a", ready_at=T - 100)], since=T - 50) is None


def test_scrape_and_admin_addresses_come_from_the_pod():
    assert source.metrics_url(pod()) == "http://10.0.0.7:8000/metrics"  # the operator's pod template
    custom = pod(ip="fd00::7", annotations={"prometheus.io/port": "9400", "prometheus.io/path": "stats"}, admin_port=9401)
    assert source.metrics_url(custom) == "http://[fd00::7]:9400/stats"
    assert source.admin_url(custom) == "http://[fd00::7]:9401/admin/batch-limits"


# --- Prometheus ------------------------------------------------------------------------------------------------


def as_prometheus_result(text: str, pod_name: str, extra: dict | None = None) -> list[dict]:
    """What Prometheus answers for one pod's series: every sample with the target's labels added."""
    result = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = {"__name__": s.name, **s.labels, "namespace": "ns", "pod": pod_name, **(extra or {})}
            result.append({"metric": labels, "value": [T, repr(float(s.value)) if math.isfinite(s.value) else "+Inf"]})
    return result


def test_prometheus_results_give_the_same_snapshot_as_a_scrape():
    text = generate_latest(worker_metrics().registry).decode()
    result = as_prometheus_result(text, "p1", {"instance": "10.0.0.7:8000"}) + as_prometheus_result(
        generate_latest(worker_metrics(requests=5, ttft=3.0).registry).decode(), "p2")
    snapshots = source.snapshots_from_prometheus(result)
    direct = parse_exposition(text)
    assert set(snapshots) == {"p1", "p2"}
    assert snapshots["p1"].histograms == direct.histograms and snapshots["p1"].values == direct.values
    assert source.reported_limits(snapshots["p1"]) == (64, 2048)
    assert snapshots["p2"].histograms["vllm:time_to_first_token_seconds"].count == 5
    # A pod whose histogram lost its +Inf bucket is left out, as an unreadable scrape would be.
    broken = [r for r in as_prometheus_result(text, "p3") if r["metric"].get("le") != "+Inf"]
    assert "p3" not in source.snapshots_from_prometheus(broken)
    times = source.scrape_times_from_prometheus([{"metric": {"pod": "p1"}, "value": [T, "1767268790.5"]},
                                                 {"metric": {"pod": "p1"}, "value": [T, "1767268791"]}])
    assert times == {"p1": 1767268791.0}


def test_prometheus_queries_select_the_pods_of_one_deployment():
    series, times = source.prometheus_queries("llm", ["chat-7d9f-abc.x", "chat-7d9f-def"], "kubernetes_namespace",
                                              "kubernetes_pod_name")
    assert series == ('{__name__=~"vllm:.+|tideserve_.+",kubernetes_namespace="llm",'
                      'kubernetes_pod_name=~"chat-7d9f-abc\\\\.x|chat-7d9f-def"}')
    assert times.startswith("max by (kubernetes_pod_name) (timestamp(vllm:num_requests_running{")


@pytest.mark.asyncio
async def test_collectors_over_http():
    text = generate_latest(worker_metrics().registry).decode()
    puts = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.9":
            raise httpx.ConnectError("connection refused")
        if request.url.path == "/metrics":
            return httpx.Response(200 if request.url.host == "10.0.0.7" else 500, text=text)
        if request.url.path == "/admin/batch-limits":
            puts.append((request.url.host, json.loads(request.content), request.headers.get("authorization")))
            return httpx.Response(200, json={})
        if request.url.path == "/api/v1/query":
            query = request.url.params["query"]
            if query.startswith("max by"):
                return httpx.Response(200, json={"status": "success", "data": {"result": [
                    {"metric": {"pod": "a"}, "value": [T, str(T - 3)]}]}})
            return httpx.Response(200, json={"status": "success", "data": {"result": as_prometheus_result(text, "a")}})
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        collected = await source.scrape_pods(client, [pod("a"), pod("b", ip="10.0.0.8"), pod("c", ip="10.0.0.9")], 1.0)
        assert set(collected.snapshots) == {"a"}
        assert collected.errors["b"] == "/metrics answered 500" and "ConnectError" in collected.errors["c"]
        assert await source.put_batch_limits(client, pod("a"), 32, 1024, 1.0, token="t") is None
        assert puts == [("10.0.0.7", {"max_num_seqs": 32, "max_num_batched_tokens": 1024}, "Bearer t")]
        assert "ConnectError" in await source.put_batch_limits(client, pod("c", ip="10.0.0.9"), 32, 1024, 1.0)
        via = await source.query_prometheus(client, "http://prom:9090/", "ns", [pod("a"), pod("b")], 1.0)
        assert set(via.snapshots) == {"a"} and via.times["a"] == T - 3 and via.errors == {"b": "no series in Prometheus"}
        assert via.snapshots["a"].histograms == parse_exposition(text).histograms
        down = await source.query_prometheus(client, "http://10.0.0.9:9090", "ns", [pod("a")], 1.0)
        assert not down.snapshots and "Prometheus query failed" in down.errors["a"]


# --- status and events ------------------------------------------------------------------------------------------


def observe(spec: dict, windows=2, **kwargs) -> tuple[Observation, Decision, TideservePolicy]:
    """A few real windows through the aggregator and the policy."""
    policy = TideservePolicy(policy_config(spec))
    aggregator = WindowAggregator()
    m = EngineMetrics("m")
    obs = decision = None
    for i in range(windows):
        for _ in range(kwargs.get("requests", 100)):
            m.ttft.observe(kwargs.get("ttft", 0.3))
            m.tpot.observe(kwargs.get("tpot", 0.02))
            m.e2e.observe(1.0)
            m.prompt_len.observe(300)
            m.output_len.observe(50)
        snapshot = None if kwargs.get("broken") else parse_exposition(generate_latest(m.registry).decode())
        obs = aggregator.observe(T + 15 * i, [ReplicaSample("p", T + 15 * i, True, T - 100, snapshot)],
                                 desired_replicas=1, pending_replicas=0, max_num_seqs=256, max_num_batched_tokens=8192)
        decision = policy.decide(obs)
    return obs, decision, policy


def test_status_of_a_decision_fits_the_crd_schema():
    obj = llmd()
    obs, decision, policy = observe(obj["spec"])
    limits = {"maxNumSeqs": decision.max_num_seqs, "maxNumBatchedTokens": decision.max_num_batched_tokens}
    auto = loop_status.autoscaling_status(decision, obs, policy.config, "active", limits, NOW)
    assert auto["lastDecision"]["reasonCode"] in loop_status.REASON_CODES
    assert auto["slo"]["ttftTargetMs"] == 2000 and auto["load"]["meanInputTokens"] == 300
    latency = loop_status.latency_p90(obs, NOW)
    assert 200 < latency["ttftP90Ms"] <= 500 and latency["tpotP90Ms"] <= 25
    conditions = loop_status.loop_conditions(decision, obs, policy.config, [], 2, NOW)
    obj["status"] = {"autoscaling": auto, "metrics": latency, "conditions": conditions, "batchLimits": limits}
    assert schema_errors(obj) == []
    # NaN and infinities never reach JSON.
    decision.details.update(rate=math.nan, demand=math.inf)
    auto = loop_status.autoscaling_status(decision, obs, policy.config, "active", None, NOW)
    assert "requestRate" not in auto["load"] and "demand" not in auto["load"]


def test_conditions_for_fresh_stale_and_first_windows():
    spec = llmd()["spec"]
    obs, decision, policy = observe(spec, windows=1)  # the first window: nothing to compare with yet
    first = loop_status.loop_conditions(decision, obs, policy.config, [], 1, NOW)
    assert [(c["type"], c["status"], c["reason"]) for c in first] == [("MetricsStale", "Unknown", "WaitingForBaseline")]
    assert loop_status.condition_events([], first) == []
    obs, decision, policy = observe(spec)
    fresh = loop_status.loop_conditions(decision, obs, policy.config, first, 1, NOW)
    assert {c["type"]: (c["status"], c["reason"]) for c in fresh} == {"MetricsStale": ("False", "MetricsFresh"),
                                                                      "SLOMet": ("True", "WithinTarget"),
                                                                      "SLOInfeasible": ("False", "AllFeasible")}
    # Prompts too long for the TTFT target: SLOInfeasible with the share and the length, a Warning when it turns.
    decision.details.update(infeasible_share=0.13, max_feasible_prompt=49152.0)
    infeasible = loop_status.loop_conditions(decision, obs, policy.config, fresh, 1, NOW)
    (cond,) = [c for c in infeasible if c["type"] == "SLOInfeasible"]
    assert cond["status"] == "True" and cond["reason"] == "PromptsTooLong"
    assert "13.0% of requests have prompts over 49152 tokens" in cond["message"]
    assert [e.reason for e in loop_status.condition_events(fresh, infeasible)] == ["SLOInfeasible"]
    auto = loop_status.autoscaling_status(decision, obs, policy.config, "active", None, NOW)
    assert auto["slo"]["infeasibleShare"] == 0.13 and auto["slo"]["maxFeasiblePromptTokens"] == 49152
    decision.details.update(infeasible_share=0.0)
    obs, decision, policy = observe(spec, broken=True)
    stale = loop_status.loop_conditions(decision, obs, policy.config, fresh, 1, NOW)
    assert [(c["type"], c["status"], c["reason"]) for c in stale] == [("MetricsStale", "True", "ScrapeFailed")]
    assert [e.reason for e in loop_status.condition_events(fresh, stale)] == ["MetricsStale"]
    obs, decision, policy = observe(spec, ttft=5.0)
    missed = loop_status.loop_conditions(decision, obs, policy.config, fresh, 1, NOW)
    assert {c["type"]: c["status"] for c in missed}["SLOMet"] == "False"
    assert [e.reason for e in loop_status.condition_events(fresh, missed)] == ["SLOMissed"]


def test_merged_conditions_keep_the_other_writers_and_their_order():
    ready = {"type": "Ready", "status": "True", "reason": "Available", "message": "", "lastTransitionTime": "x"}
    other = {"type": "Example", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "x"}
    stale_old = {"type": "MetricsStale", "status": "True", "reason": "ScrapeFailed", "message": "", "lastTransitionTime": "x"}
    stale_new = {**stale_old, "status": "False", "reason": "MetricsFresh"}
    slo = {"type": "SLOMet", "status": "True", "reason": "WithinTarget", "message": "", "lastTransitionTime": "x"}
    merged = loop_status.merge_conditions([ready, stale_old, other], [stale_new, slo])
    assert merged == [ready, stale_new, other, slo]
    assert loop_status.without_loop_conditions(merged) == [ready, other]
    # Reconcile keeps them: they are not its own.
    obj = llmd()
    obj["status"] = {"conditions": merged}
    computed = status.compute_status(obj, None, [], [], None, NOW)["conditions"]
    assert [c["type"] for c in computed][-3:] == ["MetricsStale", "Example", "SLOMet"]


def test_decision_events_only_on_changes():
    hold = Decision(T, 2, 64, 2048, "hold at 2", "hold")
    up = Decision(T, 4, 64, 2048, "scale up 2->4: demand", "scale-up", apply=False)
    assert loop_status.decision_events(hold, "active", 2, False, 2, None, None) == []
    assert [e.reason for e in loop_status.decision_events(up, "advisory", 2, False, 2, None, None)] == ["ScaleRecommended"]
    assert loop_status.decision_events(up, "advisory", 2, False, 4, None, None) == []  # said already
    applied = loop_status.decision_events(Decision(T, 4, 32, 1024, "scale up 2->4: demand", "scale-up"), "active", 2,
                                          True, 2, {"maxNumSeqs": 64, "maxNumBatchedTokens": 2048},
                                          {"maxNumSeqs": 32, "maxNumBatchedTokens": 1024})
    assert [(e.reason, e.message.split(":")[0]) for e in applied] == [
        ("AutoscaledUp", "spec.replicas 2 -> 4"), ("BatchLimitsChanged", "max_num_seqs 64 -> 32, max_num_batched_tokens 2048 -> 1024")]


def test_reason_codes():
    stale = Decision(T, 1, 1, 1, "MetricsStale: holding", "hold", details={"stale": True})
    pending = Decision(T, 1, 1, 1, "CapacityLimited: 1 new replica(s) still Pending", "hold", details={})
    forecast = Decision(T, 3, 1, 1, "scale up", "scale-up", forecast={"seasonal": True, "rate": 9.0},
                        details={"rate": 4.0, "demand": 9.0})
    live = Decision(T, 3, 1, 1, "scale up", "scale-up", forecast={"seasonal": True, "rate": 2.0},
                    details={"rate": 9.0, "demand": 9.0})
    codes = [loop_status.reason_code(d) for d in (stale, pending, forecast, live)]
    assert codes == ["MetricsStale", "CapacityLimited", "Forecast", "Demand"]
    assert loop_status.reason_code(Decision(T, 1, 1, 1, "batch limits", "batch-limit")) == "TPOT"


def test_batch_limits_in_status_are_the_autoscalers_only_while_it_runs_them():
    chosen = {"maxNumSeqs": 48, "maxNumBatchedTokens": 1024}
    for mode, kind, expected in (("active", "tideserve", chosen), ("advisory", "tideserve", None), ("active", "vllm", None)):
        obj = llmd(mode=mode, kind=kind)
        obj["status"] = {"autoscaling": {"batchLimits": chosen}}
        assert status.batch_limits(obj) == (expected or {"maxNumSeqs": 256, "maxNumBatchedTokens": 8192})
        assert status.compute_status(obj, None, [], [], None, NOW)["batchLimits"] == status.batch_limits(obj)
    obj = llmd()
    obj["status"] = {"autoscaling": {"batchLimits": {"maxNumSeqs": 999, "maxNumBatchedTokens": 100}}}
    assert status.batch_limits(obj) == {"maxNumSeqs": 256, "maxNumBatchedTokens": 256}  # never above the spec's ceiling


def test_replace_patch_removes_what_is_gone():
    current = {"mode": "active", "slo": {"ttftMs": 1.0, "tpotMs": 2.0}, "batchLimits": {"maxNumSeqs": 3}}
    assert replace_patch(current, {"mode": "advisory", "slo": {"ttftMs": 1.0}}) == {
        "mode": "advisory", "slo": {"tpotMs": None}, "batchLimits": None}
    assert replace_patch(None, {"mode": "active"}) == {"mode": "active"}


def test_peering_rule_is_kopfs():
    now = NOW
    alive = {"priority": 0, "lifetime": 60, "lastseen": iso(T - 10)}
    assert peering_allows({"me": alive}, "me", 0, now)
    assert not peering_allows({"me": alive, "other": alive}, "me", 0, now)  # same priority: kopf pauses both
    assert peering_allows({"other": alive}, "me", 10, now)
    assert not peering_allows({"other": {**alive, "priority": 20}}, "me", 10, now)
    assert peering_allows({"other": {**alive, "priority": 20, "lastseen": iso(T - 100)}}, "me", 10, now)  # dead


def test_oldest_priority_lets_the_first_replica_act_and_the_next_oldest_take_over():
    import argparse

    from tideserve.operator.main import peering_priority

    first, second, third = (peering_priority("oldest", now=T - age) for age in (3600.0, 60.0, 60.0))
    assert first > second and first > third and second != third  # same millisecond: the random digits differ
    alive = {"lifetime": 60, "lastseen": iso(T - 10)}
    peers = {"a": {**alive, "priority": first}, "b": {**alive, "priority": second}, "c": {**alive, "priority": third}}
    assert [n for n, p in (("a", first), ("b", second), ("c", third)) if peering_allows(peers, n, p, NOW)] == ["a"]
    peers["a"]["lastseen"] = iso(T - 100)  # the first one is gone: exactly one of the others acts
    assert sum(peering_allows(peers, n, p, NOW) for n, p in (("b", second), ("c", third))) == 1
    assert peering_priority("-7") == -7
    with pytest.raises(argparse.ArgumentTypeError, match="integer or 'oldest'"):
        peering_priority("newest")


def test_own_metrics_per_deployment_and_forgotten_with_it():
    metrics = AutoscalerMetrics()
    spec = llmd()["spec"]
    config = policy_config(spec)
    obs, decision, _ = observe(spec)
    conditions = [{"type": "SLOMet", "status": "True"}, {"type": "CapacityLimited", "status": "False"},
                  {"type": "SLOInfeasible", "status": "True"}]
    metrics.record("ns", "a", decision, obs, 1, config, conditions)
    metrics.record("ns", "b", decision, obs, 0, config, [])
    metrics.pushed("ns", "a", 2, 1)
    get = metrics.registry.get_sample_value
    a = {"namespace": "ns", "llmdeployment": "a"}
    assert get("tideserve_autoscaler_desired_replicas", a) == decision.replicas
    assert get("tideserve_autoscaler_scrape_errors_total", a) == 1
    assert get("tideserve_autoscaler_batch_limit_pushes_total", {**a, "result": "error"}) == 1
    assert get("tideserve_autoscaler_decisions_total", {**a, "action": decision.action,
                                                        "reason": loop_status.reason_code(decision)}) == 1
    # The SLO and the conditions, for rules and dashboards to join with the workers' series.
    assert get("tideserve_autoscaler_slo_target_seconds", {**a, "kind": "ttft"}) == 2.0
    assert get("tideserve_autoscaler_slo_target_seconds", {**a, "kind": "tpot"}) == 0.05
    assert get("tideserve_autoscaler_slo_target_attainment", a) == config.attainment_target
    assert [get("tideserve_autoscaler_condition", {**a, "condition": c}) for c in
            ("SLOMet", "CapacityLimited", "SLOInfeasible")] == [1, 0, 1]
    # The buckets that count as within target: the workers' largest edges not above 2 s and 50 ms, as they
    # label them on /metrics.
    exposition = generate_latest(metrics.registry).decode()
    ttft_le, tpot_le = (max(e for e in buckets if e <= target) for buckets, target in
                        ((TTFT_BUCKETS, 2.0), (TPOT_BUCKETS, 0.05)))
    assert f'tideserve_autoscaler_slo_within_bucket{{kind="ttft",le="{ttft_le}",llmdeployment="a",namespace="ns"}} 1.0' \
        in exposition
    assert f'tideserve_autoscaler_slo_within_bucket{{kind="tpot",le="{tpot_le}",llmdeployment="a",namespace="ns"}} 1.0' \
        in exposition
    worker = generate_latest(EngineMetrics("m").registry).decode()
    assert f'vllm:time_to_first_token_seconds_bucket{{le="{ttft_le}",model_name="m"}}' in worker
    assert f'vllm:request_time_per_output_token_seconds_bucket{{le="{tpot_le}",model_name="m"}}' in worker
    # Another target moves the bucket: the old label set goes, not left beside the new one.
    metrics.record("ns", "a", decision, obs, 0, policy_config({**spec, "slo": {**spec["slo"],
                                                                              "ttft": {**spec["slo"]["ttft"],
                                                                                       "targetMs": 500}}}), [])
    assert get("tideserve_autoscaler_slo_within_bucket", {**a, "kind": "ttft", "le": str(ttft_le)}) is None
    assert get("tideserve_autoscaler_slo_within_bucket",
               {**a, "kind": "ttft", "le": str(max(e for e in TTFT_BUCKETS if e <= 0.5))}) == 1
    metrics.forget("ns", "a")
    assert get("tideserve_autoscaler_desired_replicas", a) is None
    assert get("tideserve_autoscaler_condition", {**a, "condition": "SLOMet"}) is None
    assert "llmdeployment=\"a\"" not in generate_latest(metrics.registry).decode()
    assert get("tideserve_autoscaler_desired_replicas", {"namespace": "ns", "llmdeployment": "b"}) == decision.replicas


# --- persisted state ---------------------------------------------------------------------------------------------


def filled_state(spec: dict, windows: int, interval_s: float) -> tuple[TideservePolicy, dict]:
    """The largest state a policy can hold: every profile slot learned, one error-budget window per interval
    over the whole season."""
    policy = TideservePolicy(policy_config(spec))
    state = policy.state_dict()
    rng = random.Random(1)
    for key in autoscaler_state.PROFILES:
        profile = state["forecaster"][key]
        profile["values"] = [rng.uniform(0.1, 5000.0) for _ in profile["values"]]
        profile["counts"] = [rng.randint(1, 10**6) for _ in profile["counts"]]
    start = T - windows * interval_s
    budget = []
    for i in range(windows):
        total = float(rng.randint(0, 5000))
        budget.append([start + i * interval_s, total, total * rng.uniform(0.9, 1.0)])
    state["budget"]["windows"] = budget
    return policy, state


def test_state_stays_bounded_and_keeps_what_matters():
    obj = llmd(intervalSeconds=5)
    obj["spec"]["seasonality"] = {"enabled": True, "periodSeconds": 604800, "leadTimeSeconds": 600}
    policy, state = filled_state(obj["spec"], windows=604800 // 5, interval_s=5)  # a week at 5 s: 120 960 windows
    assert len(json.dumps(state)) > 2 * 2**20  # what it would be without compaction
    text = autoscaler_state.dumps(state)
    assert len(text.encode()) < autoscaler_state.MAX_STATE_BYTES  # a ConfigMap holds 1 MiB
    saved = autoscaler_state.loads(text)
    windows = saved["budget"]["windows"]
    assert len(windows) <= autoscaler_state.BUDGET_BUCKETS + autoscaler_state.RECENT_WINDOWS
    assert windows[-8:] == state["budget"]["windows"][-8:]  # the burn rate reads these
    total = sum(w[1] for w in state["budget"]["windows"])
    good = sum(w[2] for w in state["budget"]["windows"])
    assert sum(w[1] for w in windows) == pytest.approx(total) and sum(w[2] for w in windows) == pytest.approx(good)
    assert autoscaler_state.restore(policy, saved) == []
    assert policy.budget.attainment == pytest.approx(good / total)
    original = state["forecaster"]["weekly"]["values"]
    restored = policy.forecaster.weekly.values
    assert all(abs(a - b) <= 1e-5 * a for a, b in zip(original, restored))


def test_restore_keeps_what_fits_a_changed_spec():
    spec = llmd()["spec"]
    _, _, learned = observe(spec, windows=6)
    saved = autoscaler_state.loads(autoscaler_state.dumps(learned.state_dict()))
    assert sum(saved["forecaster"]["daily"]["counts"]) == 5
    # Same settings: everything back.
    same = TideservePolicy(policy_config(spec))
    assert autoscaler_state.restore(same, saved) == []
    assert same.forecaster.daily.counts == learned.forecaster.daily.counts and same.headroom == learned.headroom
    # A new season period, a new attainment goal and a lower batch-limit ceiling.
    changed = copy.deepcopy(spec)
    changed["seasonality"]["periodSeconds"] = 3600
    changed["slo"]["targetAttainment"] = 0.99
    changed["engine"]["maxNumSeqs"] = 32
    policy = TideservePolicy(policy_config(changed))
    assert autoscaler_state.restore(policy, saved) == ["seasonal profiles (season period or slot changed)"]
    assert sum(policy.forecaster.daily.counts) == 0
    assert policy.budget.target == 0.99 and len(policy.budget.windows) == len(learned.budget.windows)
    assert policy.model.params.max_num_seqs == 32
    # Garbage is refused by loads(); a policy is never half-loaded.
    with pytest.raises(ValueError):
        autoscaler_state.loads('{"format": 99}')
    broken = copy.deepcopy(saved)
    broken["model"] = {"params": {}}
    fresh = TideservePolicy(policy_config(spec))
    assert autoscaler_state.restore(fresh, broken)[0].startswith("everything")


def test_state_configmap_is_owned_by_its_llmdeployment():
    cm = autoscaler_state.state_configmap(llmd(), "{}")
    assert cm["metadata"]["name"] == "smollm2-autoscaler-state" and cm["data"] == {"state.json": "{}"}
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


# --- reconcile and the loop writing status at the same time ------------------------------------------------------


class ConflictingKube:
    """Serves one LLMDeployment and its Deployment; the first status patch meets a write of the loop (409)."""

    def __init__(self, obj: dict, deployment: dict):
        self.obj, self.deployment, self.conflicts, self.patches = obj, deployment, 1, []

    def get(self, path):
        if "/llmdeployments/" in path:
            return copy.deepcopy(self.obj)
        return copy.deepcopy(self.deployment) if "/deployments/" in path else None

    def list(self, path, selector):
        return []

    def create(self, path, body, field_manager=None):
        return {**body, "metadata": {**body["metadata"], "uid": "c", "resourceVersion": "1"}}

    def apply(self, path, body, field_manager):
        if "/deployments/" in path:
            self.deployment = {**body, "metadata": {**body["metadata"], "uid": "d", "resourceVersion": "4"}}
            return self.deployment
        return self.create(path, body)

    def merge_patch(self, path, patch):
        self.patches.append((path, patch))
        if path.endswith("/status"):
            if self.conflicts:
                self.conflicts -= 1
                self.obj["metadata"]["resourceVersion"] = "8"  # the loop wrote SLOMet meanwhile
                self.obj["status"]["conditions"].append({"type": "SLOMet", "status": "True", "reason": "WithinTarget",
                                                         "message": "", "lastTransitionTime": "x"})
                raise ApiException(status=409, reason="Conflict")
            self.obj["status"] = {**self.obj["status"], **patch["status"]}
            return self.obj
        self.deployment = {**self.deployment, "spec": {**self.deployment["spec"], **patch.get("spec", {})}}
        return self.deployment


def test_a_reconcile_that_meets_the_loops_status_write_keeps_its_events_and_decision():
    from tideserve.operator import manifests
    from tideserve.operator.admin_token import AdminKey

    obj = llmd()
    obj["spec"]["replicas"] = 3
    obj["status"] = {"conditions": []}
    dep = manifests.build_deployment(obj, OperatorConfig())
    dep["spec"]["replicas"] = 1
    dep["metadata"].update(uid="d", resourceVersion="3", generation=1)
    kube = ConflictingKube(obj, dep)
    events = reconcile.reconcile(kube, OperatorConfig(), AdminKey(), "default", "smollm2", NOW)
    assert [e.reason for e in events if e.reason == "Scaled"] == ["Scaled"]
    status_patches = [p for path, p in kube.patches if path.endswith("/status")]
    assert len(status_patches) == 2 and status_patches[1]["metadata"]["resourceVersion"] == "8"
    assert kube.obj["status"]["lastScalingDecision"]["to"] == 3
    assert "SLOMet" in {c["type"] for c in kube.obj["status"]["conditions"]}  # the loop's condition stays


def test_the_operator_with_its_autoscaler_never_imports_torch():
    """The operator image has no torch: the loop uses the policy and the metrics parser, never the worker."""
    import subprocess
    import sys

    code = ("import sys, tideserve.operator.handlers, tideserve.operator.main; "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip() == "False"


def test_only_pods_of_the_deployments_own_replicasets_are_trusted():
    def obj(name, uid, owner_uid=None, controller=True):
        refs = [{"uid": owner_uid, "controller": controller, "kind": "X", "name": "x", "apiVersion": "v1"}] if owner_uid else []
        return {"metadata": {"name": name, "uid": uid, "ownerReferences": refs}}

    deployment = obj("chat", "d1")
    sets = [obj("chat-1", "rs1", "d1"), obj("chat-old", "rs0", "d1"), obj("other", "rs9", "d9")]
    pods = [obj("a", "p1", "rs1"), obj("b", "p2", "rs0"), obj("copied-labels", "p3"), obj("other-app", "p4", "rs9"),
            obj("not-controlled", "p5", "rs1", controller=False)]
    assert [p["metadata"]["name"] for p in source.owned_pods(pods, sets, deployment)] == ["a", "b"]
    assert source.owned_pods(pods, sets, None) == []


def test_the_window_carries_the_smallest_replicas_kv_capacity():
    """Two workers report their KV caches; one replica is planned to hold what the smaller one holds. A worker
    that does not say (vLLM) leaves it unknown."""
    aggregator = WindowAggregator()
    samples = []
    for name, tokens in (("a", 40_000), ("b", 25_000)):
        m = EngineMetrics("m")
        m.kv_capacity_tokens.set(tokens)
        samples.append(ReplicaSample(name, T, True, T - 100, parse_exposition(generate_latest(m.registry).decode())))
    obs = aggregator.observe(T, samples, desired_replicas=2, pending_replicas=0, max_num_seqs=256,
                             max_num_batched_tokens=8192)
    assert obs.kv_capacity_tokens == 25_000
    silent = parse_exposition("vllm:num_requests_running 0\n")
    obs = WindowAggregator().observe(T, [ReplicaSample("v", T, True, T - 100, silent)], desired_replicas=1,
                                     pending_replicas=0, max_num_seqs=256, max_num_batched_tokens=8192)
    assert obs.kv_capacity_tokens is None


def test_a_restarted_worker_counts_from_zero_as_prometheus_reads_a_counter_reset():
    """A worker that restarted between two samples (same pod name, a container restart): the window counts what
    the new process counted, never a negative delta, whether the restart shows in the start time or only in a
    counter that went down."""

    def snapshot(requests: int):
        m = EngineMetrics("m")
        for _ in range(requests):
            m.ttft.observe(0.2)
            m.e2e.observe(1.0)
        return parse_exposition(generate_latest(m.registry).decode())

    def window(restart_known: bool, before: int, after: int) -> float:
        aggregator = WindowAggregator()
        common = dict(desired_replicas=1, pending_replicas=0, max_num_seqs=256, max_num_batched_tokens=8192)
        aggregator.observe(T, [ReplicaSample("a", T, True, T - 100, snapshot(before))], **common)
        started = T + 5 if restart_known else T - 100
        obs = aggregator.observe(T + 15, [ReplicaSample("a", T + 15, True, started, snapshot(after))], **common)
        assert not obs.stale
        return obs.ttft.count

    assert window(True, 50, 80) == 80  # more requests since the restart than before it: only the start time tells
    assert window(True, 50, 20) == 20
    assert window(False, 50, 20) == 20  # start time unknown to the sampler: the counter went down
    assert window(False, 50, 80) == 30  # no restart: the growth


# vLLM v0.11's exposition of the series the autoscaler reads: its names, its labels (model_name, engine) and
# its bucket edges; the cache configuration is an Info metric whose labels carry the KV cache's size.
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
VLLM_STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
VLLM_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class VllmLikeWorker:
    """A worker that exports what vLLM exports and nothing of tideserve's: no step statistics, no batch limits."""

    def __init__(self, num_gpu_blocks: int = 27_000, block_size: int = 16):
        from prometheus_client import CollectorRegistry, Gauge, Histogram, Info

        self.registry = r = CollectorRegistry()
        labels = ("model_name", "engine")

        def hist(name, buckets):
            return Histogram(name, name, labels, buckets=buckets, registry=r).labels("llama", "0")

        self.itl = hist("vllm:inter_token_latency_seconds", VLLM_ITL_BUCKETS)
        self.steps = hist("vllm:iteration_tokens_total", VLLM_STEP_TOKEN_BUCKETS)
        self.ttft = hist("vllm:time_to_first_token_seconds", VLLM_ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", VLLM_ITL_BUCKETS)
        self.prompt = hist("vllm:request_prompt_tokens", VLLM_TOKEN_BUCKETS)
        self.output = hist("vllm:request_generation_tokens", VLLM_TOKEN_BUCKETS)
        Gauge("vllm:num_requests_running", "", labels, registry=r).labels("llama", "0").set(3)
        Gauge("vllm:kv_cache_usage_perc", "", labels, registry=r).labels("llama", "0").set(0.4)
        Info("vllm:cache_config", "", registry=r).info({
            "block_size": str(block_size), "cache_dtype": "auto", "enable_prefix_caching": "True",
            "gpu_memory_utilization": "0.9", "num_gpu_blocks": str(num_gpu_blocks), "num_cpu_blocks": "None"})

    def run_steps(self, truth, steps: int, decodes: int, prefill: int, context: float) -> float:
        """`steps` engine steps of `decodes` running sequences and `prefill` prompt tokens each; returns the step
        time the true engine takes."""
        step = truth.step_time(decodes, decodes * context, prefill)
        for _ in range(steps):
            self.steps.observe(decodes + prefill)
            for _ in range(decodes):
                self.itl.observe(step)
        return step

    def finish(self, requests: int, prompt: int, output: int) -> None:
        for _ in range(requests):
            self.prompt.observe(prompt)
            self.output.observe(output)
            self.ttft.observe(0.2)
            self.e2e.observe(5.0)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def test_a_vllm_worker_is_calibrated_from_the_series_it_exports():
    """vLLM has no per-step time: the window's steps, step time, decode batch and tokens per step are read from
    its inter-token latency and its tokens-per-step histogram, its KV capacity from its cache configuration, the
    same through a direct scrape and through Prometheus; fed to the policy, they recover a true engine twice
    as slow per step as the bootstrap profile."""
    truth = dataclasses.replace(H100_8B, base_s=2 * H100_8B.base_s, per_seq_s=2 * H100_8B.per_seq_s,
                                per_context_token_s=2 * H100_8B.per_context_token_s,
                                per_prefill_token_s=2 * H100_8B.per_prefill_token_s)
    worker = VllmLikeWorker()
    spec = llmd(kind="vllm")["spec"]
    policy = TideservePolicy(policy_config(spec))
    aggregator = WindowAggregator()
    rng = random.Random(0)
    common = dict(desired_replicas=1, pending_replicas=0, max_num_seqs=256, max_num_batched_tokens=8192)
    aggregator.observe(T, [ReplicaSample("v", T, True, T - 100, parse_exposition(worker.exposition()))], **common)
    for i in range(1, 121):
        decodes, prefill = rng.randint(1, 200), rng.choice((0, 256, 1024, 4096))
        step = worker.run_steps(truth, 200, decodes, prefill, context=1000 + 200 / 2)
        worker.finish(20, prompt=1000, output=200)
        text = worker.exposition()
        obs = aggregator.observe(T + 15 * i, [ReplicaSample("v", T + 15 * i, True, T - 100, parse_exposition(text))],
                                 **common)
        assert (obs.steps, obs.step_seqs, obs.step_tokens) == (200, decodes, decodes + prefill)
        assert obs.step_s == pytest.approx(step)
        policy.decide(obs)
    assert obs.kv_capacity_tokens == 27_000 * 16
    assert policy.model.params.kv_capacity_tokens == 27_000 * 16
    for name in ("base_s", "per_seq_s", "per_prefill_token_s"):
        assert getattr(policy.model.params, name) == pytest.approx(getattr(truth, name), rel=0.15), name
    # Through Prometheus: the same series as an instant query returns them (every label kept by Prometheus).
    via_prometheus = source.snapshots_from_prometheus(_as_instant_query(text, "v"))["v"]
    assert via_prometheus == parse_exposition(text)
    assert via_prometheus.value("tideserve_kv_cache_capacity_tokens") == 27_000 * 16


def _as_instant_query(text: str, pod: str) -> list[dict]:
    """An exposition's series as Prometheus's instant query returns them, with the pod's label added."""
    return [{"metric": {"__name__": s.name, **s.labels, "pod": pod}, "value": [T, repr(s.value)]}
            for f in text_string_to_metric_families(text) for s in f.samples]


def test_two_scrapes_of_a_data_parallel_vllm_read_as_one_replica_of_both_engines():
    """tests/fixtures/vllm: vLLM 0.11's exposition (two engines in one pod, the deprecated inter-token latency
    name beside the new one, process/Python/HTTP families, _created series). The window's numbers by hand from
    the files: each inter-token latency sample counted once, not under both names; the pod's KV capacity is both
    engines' pools, its usage their mean; through Prometheus the same."""
    fixtures = Path(__file__).parent / "fixtures" / "vllm"
    texts = [(fixtures / f"vllm-0.11-dp2-{t}.txt").read_text() for t in ("0s", "15s")]
    common = dict(desired_replicas=1, pending_replicas=0, max_num_seqs=256, max_num_batched_tokens=8192)
    for parse in (parse_exposition, lambda text: source.snapshots_from_prometheus(_as_instant_query(text, "v"))["v"]):
        aggregator = WindowAggregator()
        aggregator.observe(T, [ReplicaSample("v", T, True, T - 3600, parse(texts[0]))], **common)
        obs = aggregator.observe(T + 15, [ReplicaSample("v", T + 15, True, T - 3600, parse(texts[1]))], **common)
        assert obs.steps == (4300 - 4000) + (4180 - 3900) == 580
        itl_samples = (79200 - 72000) + (71900 - 66300)
        assert itl_samples == 24 * 300 + 20 * 280 and obs.step_seqs == pytest.approx(itl_samples / 580)
        assert obs.step_s == pytest.approx(((3023.6265988035125 - 2736.4223368028674)
                                            + (2907.1844016763484 - 2655.4568597949565)) / itl_samples)
        assert obs.step_tokens == pytest.approx(((254200 - 232000) + (233900 - 216300)) / 580)
        assert obs.ttft.count == (175 - 160) + (162 - 150)
        assert obs.queue_time.total == pytest.approx((9.749947334625897 - 9.156319450345254)
                                                     + (8.649288792380991 - 7.968684171995389))
        assert (obs.running, obs.waiting) == (25 + 21, 2 + 0)
        assert obs.kv_usage == pytest.approx((0.36 + 0.3) / 2)
        assert obs.kv_capacity_tokens == (27_400 + 27_392) * 16


def test_both_collection_paths_sum_label_sets_to_the_same_bits_in_any_order():
    """A name's label sets (a histogram per step kind, say) are summed in whatever order each path sees them;
    floating-point addition depends on it, so the parser sums exactly (0.1 + 0.2 + 0.3 in either order)."""
    text = "".join(f'tideserve_mbu_sum{{kind="{k}"}} {v}\ntideserve_mbu_count{{kind="{k}"}} 1\n'
                   f'tideserve_mbu_bucket{{kind="{k}",le="+Inf"}} 1\n' for k, v in
                   (("decode", 0.1), ("prefill", 0.2), ("mixed", 0.3)))
    result = [{"metric": {"__name__": s.name, **s.labels, "pod": "p"}, "value": [T, repr(s.value)]}
              for f in text_string_to_metric_families(text) for s in f.samples]
    direct = parse_exposition(text)
    assert source.snapshots_from_prometheus(result[::-1])["p"] == direct == source.snapshots_from_prometheus(result)["p"]
    assert direct.histograms["tideserve_mbu"].total == 0.6
