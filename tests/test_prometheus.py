"""A real Prometheus server (scripts/install.sh installs Debian's; the tests skip without one, and fail under
CI=true) scraping real workers on loopback.

- The operator's `--prometheus-url` path (operator/metrics_source.query_prometheus) reads the same windows and
  takes the same decisions as a direct scrape of the same workers, through a load, a worker restart (a counter
  reset) and a worker that goes away (its series go stale), with the labels the chart's PodMonitor gives.
- `tideserve up --prometheus`: every query of the shipped dashboard returns data, and every shipped rule
  evaluates, against the local Prometheus after a short load (and the panels render to a PNG).
- The alerts fire when they should: `promtool test rules` on synthetic series.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import run_worker
from kube_tools import kube_tool, render
from test_chart import MONITORING_APIS, VALUE_SETS
from tideserve.autoscaler.policy import TideservePolicy
from tideserve.autoscaler.scrape import ReplicaSample, WindowAggregator
from tideserve.autoscaler.spec import policy_config
from tideserve.local import deployment
from tideserve.ports import free_port
from tideserve.local.runtime import LocalRuntime
from tideserve.monitoring import dashboard
from tideserve.monitoring.prometheus import RULES_FILE, PrometheusServer, ScrapeJob, write_targets
from tideserve.operator import metrics_source as source
from tideserve.operator.resource import defaulted

NAMESPACE, NAME = "llm", "chat"
SCRAPE_S = 1.0


@pytest.fixture(scope="module")
def prometheus_binary():
    return kube_tool("prometheus")


# --- the operator's two metric paths ---------------------------------------------------------------------------


def pod_monitor_relabelings() -> list[dict]:
    """The chart's worker PodMonitor relabelings in Prometheus's own configuration form (what the Prometheus
    Operator generates from them: the same fields in snake_case)."""
    (monitor,) = [d for d in render([*VALUE_SETS["monitoring"], *MONITORING_APIS])
                  if d["kind"] == "PodMonitor" and d["metadata"]["name"].endswith("-workers")]
    snake = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{snake.get(k, k): v for k, v in r.items()} for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]]


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def pod(name: str, port: int, started: float) -> dict:
    """A ready worker pod as the API server shows it, whose IP and annotated port are a loopback worker."""
    return {"metadata": {"name": name, "namespace": NAMESPACE, "creationTimestamp": iso(started - 30),
                         "annotations": {"prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "worker", "state": {"running": {"startedAt": iso(started)}}}]}}


def targets(workers: dict[str, int]) -> list[tuple[list[str], dict[str, str]]]:
    """What Kubernetes service discovery would hand Prometheus for these pods (before relabelling)."""
    return [([f"127.0.0.1:{port}"], {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": name,
                                     "__meta_kubernetes_pod_label_tideserve_io_llmdeployment": NAME})
            for name, port in workers.items()]


def load(url: str, n: int, seed: int) -> None:
    rng = random.Random(seed)

    async def one(client, i):
        words = " ".join(rng.choice(("tide", "serve", "queue", "token", "batch")) for _ in range(rng.randint(3, 40)))
        response = await client.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": words,
                                                                      "max_tokens": rng.randint(2, 24)})
        assert response.status_code == 200, response.text

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(one(client, i) for i in range(n)))

    asyncio.run(run())


class TwoPaths:
    """The operator's collection, both ways, each feeding its own aggregator and policy."""

    def __init__(self, prometheus: PrometheusServer, spec: dict):
        self.prometheus = prometheus
        self.aggregators = {"direct": WindowAggregator(), "prometheus": WindowAggregator()}
        self.policies = {path: TideservePolicy(policy_config(spec)) for path in self.aggregators}

    def round(self, pods: list[dict], now: float):
        async def collect():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(source.scrape_pods(client, pods, 5.0),
                                            source.query_prometheus(client, self.prometheus.url, NAMESPACE, pods, 5.0))

        results = {}
        for path, collected in zip(self.aggregators, asyncio.run(collect())):
            samples = [ReplicaSample(p["metadata"]["name"], collected.times.get(p["metadata"]["name"], now),
                                     True, source.started_at(p), collected.snapshots.get(p["metadata"]["name"]))
                       for p in pods]
            obs = self.aggregators[path].observe(now, samples, desired_replicas=2, pending_replicas=0,
                                                 max_num_seqs=32, max_num_batched_tokens=512)
            results[path] = (obs, self.policies[path].decide(obs), collected)
        return results


def assert_alike(results) -> None:
    (direct, d_decision, d_collected), (prom, p_decision, p_collected) = results["direct"], results["prometheus"]
    assert set(d_collected.errors) == set(p_collected.errors)
    assert prom == direct  # every histogram, gauge, step statistic and problem of the window
    assert (p_decision.action, p_decision.replicas, p_decision.max_num_seqs, p_decision.max_num_batched_tokens,
            p_decision.reason) == (d_decision.action, d_decision.replicas, d_decision.max_num_seqs,
                                   d_decision.max_num_batched_tokens, d_decision.reason)


@pytest.mark.timeout(300)
def test_the_prometheus_path_reads_the_same_windows_and_decides_as_a_direct_scrape(prometheus_binary, tiny_model_dir,
                                                                                   tmp_path):
    spec = defaulted({"apiVersion": "tideserve.io/v1alpha1", "kind": "LLMDeployment",
                      "metadata": {"name": NAME, "namespace": NAMESPACE},
                      "spec": {"model": {"name": "tiny", "source": {"path": "tiny"}},
                               "autoscaling": {"mode": "active", "minReplicas": 1, "maxReplicas": 4},
                               "slo": {"ttft": {"targetMs": 2000}, "tpot": {"targetMs": 100}}}})["spec"]
    a_port, b_port = free_port(), free_port()
    b_admin = free_port()
    file = tmp_path / "targets.json"
    write_targets(file, targets({"chat-a": a_port, "chat-b": b_port}))
    job = ScrapeJob("workers", targets_file=file, relabel_configs=pod_monitor_relabelings())
    with PrometheusServer([job], scrape_interval_s=SCRAPE_S, directory=tmp_path / "prometheus") as prometheus, \
            run_worker(tiny_model_dir, port=a_port) as a:
        started = time.time()
        paths = TwoPaths(prometheus, spec)
        pods = [pod("chat-a", a_port, started), pod("chat-b", b_port, started)]

        def settled_round():
            """One more scrape of every worker after the load stopped, then both collections."""
            prometheus.api.wait_for_scrapes("workers", after=time.time())
            return paths.round(pods, time.time())

        with run_worker(tiny_model_dir, port=b_port, admin_port=b_admin) as b:
            first = settled_round()  # baselines: no window yet, alike
            assert first["direct"][0].stale and first["direct"][0].problems == first["prometheus"][0].problems
            labels = prometheus.api.query('vllm:num_requests_running{llmdeployment="chat"}')
            assert {(s["metric"]["namespace"], s["metric"]["pod"]) for s in labels} == {(NAMESPACE, "chat-a"),
                                                                                         (NAMESPACE, "chat-b")}
            load(a.url, 24, seed=1)
            load(b.url, 16, seed=2)
            loaded = settled_round()
            assert_alike(loaded)
            assert not loaded["direct"][0].stale and loaded["direct"][0].ttft.count == 40
        # chat-b restarts on its ports (a container restart: same pod, new start time, counters from zero), and
        # serves fewer requests than before, so the reset also shows as counters going down.
        restarted = time.time()
        with run_worker(tiny_model_dir, port=b_port, admin_port=b_admin) as b:
            pods[1] = pod("chat-b", b_port, restarted)
            load(b.url, 6, seed=3)
            load(a.url, 5, seed=4)
            after_restart = settled_round()
            assert_alike(after_restart)
            assert after_restart["direct"][0].ttft.count == 11  # 5 more on chat-a, 6 since chat-b's restart
            resets = prometheus.api.query('resets(vllm:e2e_request_latency_seconds_count{pod="chat-b"}[5m])')
            assert float(resets[0]["value"][1]) >= 1  # Prometheus saw the same reset
        # chat-b is gone but its pod still shows Ready (a node that stopped answering): both paths miss it alike;
        # Prometheus marks its series stale at the first failed scrape instead of serving the last values.
        gone = settled_round()
        assert_alike(gone)
        obs = gone["prometheus"][0]
        assert obs.stale and any(p.startswith("chat-b:") for p in obs.problems)
        assert gone["prometheus"][1].action == "hold"
        assert prometheus.api.query('vllm:num_requests_running{pod="chat-b"}') == []
        assert gone["prometheus"][2].errors["chat-b"] == "no series in Prometheus"


# --- the dashboard and the rules against `tideserve up --prometheus` ----------------------------------------------

# Series that other work adds. A query may come back empty only while no target exports the series it reads;
# once one does, it must return data like every other.
PENDING_SERIES: tuple[str, ...] = ()
RATE_INTERVAL = "1m"


def up_deployment() -> dict:
    """The demo deployment on the tiny model, started at two replicas: a light load lets the policy take one
    back (a scale-down, so the decisions annotation has something to show)."""
    llmd = deployment.load("tideserve/data/demo-llmdeployment.yaml")
    llmd["metadata"]["name"] = "tiny"
    llmd["spec"]["model"] = {**llmd["spec"]["model"], "name": "tiny", "source": {"path": "tiny"}}
    llmd["spec"]["replicas"] = 2
    llmd["spec"]["autoscaling"].update(intervalSeconds=2, scaleDownStabilizationSeconds=6)
    return llmd


@pytest.mark.timeout(400)
def test_tideserve_up_with_prometheus_answers_every_dashboard_query_and_rule(prometheus_binary, tmp_path):
    runtime = LocalRuntime(up_deployment(), port=free_port(), log_dir=tmp_path, calibrate=False, prometheus=True,
                           scrape_interval_s=SCRAPE_S)
    asyncio.run(_up_with_load(runtime, tmp_path))


async def _up_with_load(runtime: LocalRuntime, tmp_path: Path) -> None:
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.started.wait(), 120)
        assert runtime.prometheus is not None, "the local Prometheus did not start"
        begin = time.time()
        async with httpx.AsyncClient(timeout=120) as client:
            rng = random.Random(5)

            async def one(delay: float):
                await asyncio.sleep(delay)
                response = await client.post(f"{runtime.url}/v1/completions", json={
                    "model": "tiny", "prompt": "tide " * rng.randint(5, 60), "max_tokens": rng.randint(4, 32)})
                assert response.status_code == 200, response.text

            await asyncio.gather(*(one(i / 3.0) for i in range(75)))  # 25 s at 3 req/s
        # The light load lets the second replica go; then one more decision and one more scrape of everything,
        # and an evaluation of the rules on it.
        for _ in range(60):
            if runtime.desired == 1:
                break
            await asyncio.sleep(1.0)
        assert any(d.action == "scale-down" for d in runtime.decisions), [(d.action, d.reason) for d in runtime.decisions]
        decided = len(runtime.decisions)
        while len(runtime.decisions) < decided + 1:
            await asyncio.sleep(0.5)
        await asyncio.to_thread(runtime.prometheus.api.wait_for_scrapes, "tideserve-autoscaler", time.time())
        await asyncio.sleep(2 * SCRAPE_S)
        await asyncio.to_thread(check_dashboard_and_rules, runtime, begin - 10, time.time(), tmp_path)
    finally:
        stop.set()
        await serving


def check_dashboard_and_rules(runtime: LocalRuntime, start: float, end: float, tmp_path: Path) -> None:
    prometheus = runtime.prometheus.api
    variables = {"namespace": runtime.namespace, "llmdeployment": runtime.name}
    exported = {s["metric"]["__name__"] for s in prometheus.query('{__name__=~"(vllm:|tideserve).+"}', at=end)}
    empty = []
    for query in dashboard.panel_queries(dashboard.load()):
        promql = dashboard.substitute(query.expr, variables, RATE_INTERVAL, interval=f"{end - start:.0f}s")
        if not prometheus.query(promql, at=end):
            empty.append((query.panel, query.legend, promql))
    pending = [e for e in empty if any(name in e[2] for name in PENDING_SERIES)]
    assert empty == pending, f"dashboard queries without data: {[e for e in empty if e not in pending]}"
    assert not any(name.startswith(p) for p in PENDING_SERIES for name in exported), \
        "a pending series is exported now: take it out of PENDING_SERIES"
    # Every rule of the shipped file loaded and evaluated without error; every recording rule has data.
    groups = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(shipped) and all(r["health"] == "ok" for r in rules), \
        [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    for rule in shipped:
        if "record" in rule:
            assert prometheus.query(rule["record"], at=end), rule["record"]
    # The panels, drawn from the same data (docs/images/dashboard.png is made this way: docs/observability.md).
    out = Path(os.environ.get("TIDESERVE_DASHBOARD_PNG", tmp_path / "dashboard.png"))
    counts = dashboard.render(prometheus, dashboard.load(), variables, start, end, out, step_s=SCRAPE_S,
                              rate_interval="30s")
    assert out.stat().st_size > 10_000
    assert [t for t, n in counts.items() if not n] == []


# --- the alerts, on synthetic series -----------------------------------------------------------------------------


def test_the_alerts_fire_on_a_fast_budget_burn_and_on_conditions_and_not_on_a_healthy_deployment(tmp_path):
    """promtool's rule unit tests: one deployment whose TTFT misses 25% of requests for an hour (the fast burn
    pages), a healthy one beside it (nothing fires), and an SLOInfeasible condition held for 30 minutes."""
    promtool = kube_tool("promtool")
    labels = 'namespace="llm",llmdeployment="{name}",pod="{name}-0",model_name="m"'

    def worker_series(name: str, good_per_min: int, total_per_min: int) -> list[dict]:
        within, beyond = "1.995", "+Inf"
        return [{"series": f'vllm:time_to_first_token_seconds_bucket{{{labels.format(name=name)},le="{within}"}}',
                 "values": f"0+{good_per_min}x90"},
                {"series": f'vllm:time_to_first_token_seconds_bucket{{{labels.format(name=name)},le="{beyond}"}}',
                 "values": f"0+{total_per_min}x90"},
                {"series": f'vllm:time_to_first_token_seconds_count{{{labels.format(name=name)}}}',
                 "values": f"0+{total_per_min}x90"},
                {"series": f'tideserve_autoscaler_slo_within_bucket{{namespace="llm",llmdeployment="{name}",'
                           f'kind="ttft",le="{within}"}}', "values": "1x90"},
                {"series": f'tideserve_autoscaler_slo_target_attainment{{namespace="llm",llmdeployment="{name}"}}',
                 "values": "0.99x90"}]

    series = worker_series("burning", 75, 100) + worker_series("healthy", 100, 100) + [
        {"series": 'tideserve_autoscaler_condition{namespace="llm",llmdeployment="healthy",condition="SLOInfeasible"}',
         "values": "1x90"},
        {"series": 'tideserve_autoscaler_infeasible_share{namespace="llm",llmdeployment="healthy"}', "values": "0.04x90"}]
    burn = {"severity": "page", "namespace": "llm", "llmdeployment": "burning"}
    tests = {"rule_files": [str(RULES_FILE)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "70m", "alertname": "TideserveTTFTBudgetBurnFast", "exp_alerts": [{
                "exp_labels": burn, "exp_annotations": {
                    "summary": "llm/burning: TTFT misses burn the error budget 14.4x too fast",
                    "description": "25% of requests missed the TTFT target over the last 1h (and 5m), spending 2% of "
                                   "a 30-day error budget in one hour. The LLMDeployment's status.autoscaling and "
                                   "SLOMet condition say what the autoscaler does about it."}}]},
            {"eval_time": "2m", "alertname": "TideserveTTFTBudgetBurnFast", "exp_alerts": []},  # `for` not yet held
            {"eval_time": "70m", "alertname": "TideserveTPOTBudgetBurnFast", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "TideserveSLOInfeasible", "exp_alerts": []},  # not held for 30m yet
            {"eval_time": "40m", "alertname": "TideserveSLOInfeasible", "exp_alerts": [{
                "exp_labels": {"severity": "info", "namespace": "llm", "llmdeployment": "healthy"},
                "exp_annotations": {
                    "summary": "llm/healthy: condition SLOInfeasible is True",
                    "description": "4% of requests have prompts that no replica prefills within the TTFT target: "
                                   "more replicas cannot fix them, so the autoscaler plans over the others. `kubectl "
                                   "describe llmdeployment -n llm healthy` shows the condition's message."}}]},
            {"eval_time": "40m", "alertname": "TideserveMetricsStale", "exp_alerts": []}],
        "promql_expr_test": [{"expr": "tideserve:ttft_error_ratio:rate5m", "eval_time": "60m", "exp_samples": [
            {"labels": 'tideserve:ttft_error_ratio:rate5m{namespace="llm",llmdeployment="burning"}', "value": 0.25},
            {"labels": 'tideserve:ttft_error_ratio:rate5m{namespace="llm",llmdeployment="healthy"}', "value": 0}]}],
    }]}
    file = tmp_path / "tests.yaml"
    file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
