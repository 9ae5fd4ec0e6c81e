"""The closed loop in the cluster: the real operator (kopf, handlers, the autoscaling loops) against the strict
kmock API emulator, with worker pods played by a small in-test HTTP server.

Each fake pod is a port of one aiohttp server: /metrics serves real worker metrics (tideserve.worker.metrics,
the vllm: and tideserve_ names) that grow by a chosen load on every scrape, and PUT /admin/batch-limits records
the limits and reports them from then on, as a worker does. The emulated pods point at it the way the
operator's pod template points at a worker: podIP, the prometheus.io/port annotation and the container port
named admin.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import time

import aiohttp.web
import pytest
import pytest_asyncio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tideserve.ports import free_port
from kube_fixtures import RunningOperator, api, chart_rbac, eventually, fast_key_checks, operator, requests_as_rbac, write_kubeconfig  # noqa: F401
from test_chart import CRD_DISCOVERY, WORKLOAD
from tideserve.operator import autoscaler_state
from tideserve.autoscaler.policy import TideservePolicy
from tideserve.autoscaler.spec import policy_config
from tideserve.operator.admin_token import derive_token
from tideserve.operator.autoscaler_loop import DELETION_COST_ANNOTATION, AutoscalerOptions, PeeringSettings
from tideserve.operator.manifests import object_labels
from tideserve.operator.resource import defaulted, schema_errors
from tideserve.worker.metrics import EngineMetrics

pytestmark = pytest.mark.asyncio

LLMD = ("tideserve.io", "v1alpha1", "llmdeployments")
DEPLOYMENT = ("apps", "v1", "deployments")
CONFIGMAP = ("", "v1", "configmaps")
NS = "default"
NAME = "chat"
BASE = f"/apis/tideserve.io/v1alpha1/namespaces/{NS}/llmdeployments"
PODS = f"/api/v1/namespaces/{NS}/pods"
REPLICASET = ("apps", "v1", "replicasets")
RS_PATH = f"/apis/apps/v1/namespaces/{NS}/replicasets"
RS_NAME = f"{NAME}-5d8f7b9c4"


class FakePod:
    """What one worker shows: metrics that grow by `load` requests per scrape, and live batch limits."""

    def __init__(self, name: str, limits=(256, 8192)):
        self.name, self.port = name, free_port()
        self.metrics = EngineMetrics(NAME)
        self.load, self.ttft, self.tpot, self.running = 0, 0.3, 0.02, 0.0
        self.limits = limits
        self.broken = False
        self.puts: list[dict] = []
        self.scrapes = 0
        self.authorizations: list[str | None] = []  # the Authorization header of every admin request

    def scrape(self) -> bytes:
        m = self.metrics
        for _ in range(self.load):
            m.ttft.observe(self.ttft)
            m.itl.observe(self.tpot)
            m.tpot.observe(self.tpot)
            m.e2e.observe(self.ttft + 100 * self.tpot)
            m.queue_time.observe(0.01)
            m.prompt_len.observe(500)
            m.output_len.observe(100)
        m.running.set(self.running)
        m.max_num_seqs.set(self.limits[0])
        m.max_num_batched_tokens.set(self.limits[1])
        return generate_latest(m.registry)


class FakePods:
    """One aiohttp application, one listening port per fake pod (the port tells which pod is asked)."""

    def __init__(self):
        self.pods: dict[int, FakePod] = {}
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_put("/admin/batch-limits", self._limits)
        app.router.add_get("/api/v1/query", self._prometheus)
        self.runner = aiohttp.web.AppRunner(app)
        self.prometheus_queries: list[str] = []
        self.direct_scrapes = 0
        self.admin_token = None  # a callable giving the token the admin endpoints demand, as --admin-token-file does
        self.refused_puts = 0

    def _pod(self, request) -> FakePod:
        return self.pods[request.transport.get_extra_info("sockname")[1]]

    async def _metrics(self, request):
        pod = self._pod(request)
        self.direct_scrapes += 1
        pod.scrapes += 1
        if pod.broken:
            return aiohttp.web.Response(status=500, text="engine exploded")
        return aiohttp.web.Response(body=pod.scrape(), content_type="text/plain")

    async def _limits(self, request):
        pod = self._pod(request)
        pod.authorizations.append(request.headers.get("Authorization"))
        if self.admin_token is not None and request.headers.get("Authorization") != f"Bearer {self.admin_token()}":
            self.refused_puts += 1
            return aiohttp.web.json_response({"error": "missing or invalid admin token"}, status=401)
        body = await request.json()
        pod.puts.append(body)
        pod.limits = (body["max_num_seqs"], body["max_num_batched_tokens"])
        return aiohttp.web.json_response(body)

    async def _prometheus(self, request):
        """A Prometheus that scraped every fake pod just now: each series with namespace and pod labels."""
        query = request.query["query"]
        self.prometheus_queries.append(query)
        result = []
        for pod in self.pods.values():
            if query.startswith("max by"):
                result.append({"metric": {"pod": pod.name}, "value": [time.time(), str(time.time())]})
                continue
            for family in text_string_to_metric_families(pod.scrape().decode()):
                for sample in family.samples:
                    labels = {"__name__": sample.name, **sample.labels, "namespace": NS, "pod": pod.name, "job": "pods"}
                    result.append({"metric": labels, "value": [time.time(), str(sample.value)]})
        return aiohttp.web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    async def start_prometheus(self) -> str:
        port = free_port()
        await aiohttp.web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def add(self, name: str, kind: type[FakePod] = FakePod, **kwargs) -> FakePod:
        pod = kind(name, **kwargs)
        await aiohttp.web.TCPSite(self.runner, "127.0.0.1", pod.port).start()
        self.pods[pod.port] = pod
        return pod


@pytest_asyncio.fixture
async def fake_pods():
    pods = FakePods()
    await pods.runner.setup()
    try:
        yield pods
    finally:
        await pods.runner.cleanup()


def now_iso(offset_s: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def request(api, method: str, path: str, body=None, content_type="application/merge-patch+json") -> dict:
    response = await api.request(method, path, data=json.dumps(body) if body is not None else None,
                                 headers={"Content-Type": content_type})
    assert response.status == 200, await response.text()
    return await response.json()


def llmdeployment(mode="active", replicas=1, **autoscaling) -> dict:
    return {
        "apiVersion": "tideserve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": NAME},
        "spec": {
            "model": {"name": NAME, "source": {"path": "smollm2"}},
            "engine": {"maxNumSeqs": 256, "maxNumBatchedTokens": 8192},
            "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
            "replicas": replicas,
            "autoscaling": {"mode": mode, "intervalSeconds": 1, "minReplicas": 1, "maxReplicas": 6, "maxStep": 2,
                            "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0, **autoscaling},
            "slo": {"ttft": {"targetMs": 2000}, "tpot": {"targetMs": 50}},
        },
    }


async def create(api, body: dict) -> dict:
    await request(api, "POST", BASE, body, content_type="application/json")
    await eventually(lambda: api.get(*DEPLOYMENT, NS, NAME))
    await adopt_replicaset(api)
    return api.get(*LLMD, NS, NAME)


async def replicaset(api) -> dict:
    """The ReplicaSet the Deployment controller runs the worker pods through."""
    found = api.get(*REPLICASET, NS, RS_NAME)
    if found is None:
        found = await request(api, "POST", RS_PATH, {
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": RS_NAME, "labels": object_labels(NAME)},
            "spec": {"selector": {"matchLabels": object_labels(NAME)}}}, content_type="application/json")
    return found


async def adopt_replicaset(api) -> None:
    """What the Deployment controller does: the ReplicaSet becomes the Deployment's."""
    deployment = api.get(*DEPLOYMENT, NS, NAME)
    await replicaset(api)
    await request(api, "PATCH", f"{RS_PATH}/{RS_NAME}", {"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME, "uid": deployment["metadata"]["uid"],
         "controller": True, "blockOwnerDeletion": True}]}})


async def add_pod(api, name: str, pod: FakePod | None = None, port: int | None = None,
                  unschedulable: bool = False, owned: bool = True) -> None:
    """A worker pod as the ReplicaSet controller, the scheduler and the kubelet would leave it (owned=False: a
    pod someone else created with the worker labels)."""
    port = pod.port if pod else port or free_port()
    labels = object_labels(NAME)  # the pod template's labels
    owner = await replicaset(api) if owned else None
    await request(api, "POST", PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": RS_NAME,
                                          "uid": owner["metadata"]["uid"], "controller": True}] if owner else [],
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                     "prometheus.io/path": "/metrics"}},
        "spec": {"containers": [{"name": "worker", "image": "tideserve-worker:test",
                                 "ports": [{"name": "http", "containerPort": port},
                                           {"name": "admin", "containerPort": port}]}]}},
        content_type="application/json")
    if unschedulable:
        status = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}
    else:
        status = {"phase": "Running", "podIP": "127.0.0.1", "startTime": now_iso(-120),
                  "conditions": [{"type": "PodScheduled", "status": "True"},
                                 {"type": "Ready", "status": "True", "lastTransitionTime": now_iso()}],
                  "containerStatuses": [{"name": "worker", "ready": True,
                                         "state": {"running": {"startedAt": now_iso(-100)}}}]}
    await request(api, "PATCH", f"{PODS}/{name}/status", {"status": status})


def status(api) -> dict:
    return (api.get(*LLMD, NS, NAME) or {}).get("status", {})


def condition(api, ctype: str) -> dict:
    return next((c for c in status(api).get("conditions", []) if c["type"] == ctype), {})


def events(api, reason: str) -> list[dict]:
    posted = [r.data for r in api.writes() if r.url.path.endswith("/events") and r.method == "POST"]
    return [e for e in posted if e["reason"] == reason]


def spec_writes(api) -> list:
    """The operator's writes to the LLMDeployment itself or its scale subresource (not its status)."""
    return [r for r in api.writes() if r.url.path in (f"{BASE}/{NAME}", f"{BASE}/{NAME}/scale")
            and r.method.value == "PATCH" and not r.headers.get("User-Agent", "").startswith("kmock/")]


def sample(operator, metric: str, **labels) -> float | None:
    return operator.memo.autoscaler.metrics.registry.get_sample_value(metric, {"namespace": NS, "llmdeployment": NAME, **labels})


def admin_token(api) -> str:
    """The token the operator put into the LLMDeployment's admin Secret (the pods mount it)."""
    secret = api.get("", "v1", "secrets", NS, f"{NAME}-admin")
    return base64.b64decode(secret["data"]["token"]).decode()


async def test_load_scales_up_through_spec_replicas_and_batch_limits_reach_every_pod(fast_key_checks, api, operator,
                                                                                     fake_pods):
    fake_pods.admin_token = lambda: admin_token(api)
    a = await fake_pods.add("chat-a")
    a.load = 500  # requests per scrape, about one a second: far beyond one replica
    await add_pod(api, "chat-a", a)
    await create(api, llmdeployment(maxReplicas=3))  # one step up to the most: no race with a second one

    await eventually(lambda: api.get(*LLMD, NS, NAME)["spec"]["replicas"] > 1, timeout=20)
    first = spec_writes(api)[0]
    assert first.url.path.endswith("/scale") and first.headers["Content-Type"] == "application/merge-patch+json"
    assert first.data["spec"] == {"replicas": 3}  # maxStep 2
    assert set(first.data["metadata"]) == {"resourceVersion"}  # optimistic concurrency, and nothing else
    assert not [r for r in spec_writes(api) if not r.url.path.endswith("/scale")]  # never annotations or metadata
    told = status(api)["autoscaling"]["lastDecision"]
    assert told["replicas"] == 3 and told["reason"].startswith("scale up 1->3: demand")
    # The operator's reconcile carries it to the Deployment, with the autoscaler's reason.
    await eventually(lambda: api.get(*DEPLOYMENT, NS, NAME)["spec"]["replicas"] >= 3)
    await eventually(lambda: any(e["message"].startswith("spec.replicas 1 -> 3: scale up") for e in events(api, "AutoscaledUp")))
    await eventually(lambda: any("scaled from 1 to 3: scale up 1->3" in e["message"] for e in events(api, "Scaled")))

    # Batch limits: chosen for the TPOT target, pushed to the pod, recorded where new pods find them.
    await eventually(lambda: a.puts)
    limits = await eventually(lambda: status(api).get("autoscaling", {}).get("batchLimits"))
    assert limits != {"maxNumSeqs": 256, "maxNumBatchedTokens": 8192}
    await eventually(lambda: a.limits == (status(api)["batchLimits"]["maxNumSeqs"],
                                          status(api)["batchLimits"]["maxNumBatchedTokens"]))
    assert status(api)["batchLimits"] == status(api)["autoscaling"]["batchLimits"]
    assert await eventually(lambda: events(api, "BatchLimitsChanged"))
    # A pod that becomes ready later starts with the spec's limits and is given the stored ones.
    b = await fake_pods.add("chat-b")
    await add_pod(api, "chat-b", b)
    await eventually(lambda: b.puts and b.limits == (status(api)["batchLimits"]["maxNumSeqs"],
                                                     status(api)["batchLimits"]["maxNumBatchedTokens"]))
    # A new admin key: until the kubelet syncs a pod's Secret volume the pod still wants the old token, which
    # the loop sends when the new one is refused; then the Secret holds the new key's token and that one works.
    assert fake_pods.refused_puts == 0
    old_token = admin_token(api)
    fake_pods.admin_token = lambda: old_token  # the pods' volumes are not synced yet
    operator.admin_key_file.write_text("a-new-admin-key")
    uid = api.get(*LLMD, NS, NAME)["metadata"]["uid"]
    await eventually(lambda: admin_token(api) == derive_token("a-new-admin-key", NS, NAME, uid))
    b.limits = (7, 7)  # what b reports next: not the stored limits, so the loop pushes them again
    await eventually(lambda: fake_pods.refused_puts >= 1 and b.limits != (7, 7))
    fake_pods.admin_token = lambda: admin_token(api)  # synced
    refused, b.limits = fake_pods.refused_puts, (7, 7)
    await eventually(lambda: b.limits != (7, 7))
    assert fake_pods.refused_puts == refused  # the current key's token goes first

    llmd = api.get(*LLMD, NS, NAME)
    st = llmd["status"]
    assert st["autoscaling"]["mode"] == "active" and st["autoscaling"]["lastDecision"]["applied"] is True
    assert st["autoscaling"]["load"]["requestRate"] > 100 and st["autoscaling"]["load"]["meanInputTokens"] == 500
    assert 0 < st["metrics"]["ttftP90Ms"] <= 500 and 0 < st["metrics"]["tpotP90Ms"] <= 50
    assert st["autoscaling"]["slo"]["ttftTargetMs"] == 2000 and st["autoscaling"]["slo"]["attainment"] == 1
    assert condition(api, "MetricsStale")["status"] == "False" and condition(api, "SLOMet")["status"] == "True"
    assert {"Ready", "Progressing", "Degraded", "CapacityLimited"} <= {c["type"] for c in st["conditions"]}
    assert schema_errors(llmd) == []  # every status field the loop writes is in the CRD's schema
    assert "finalizers" not in llmd["metadata"]

    assert sample(operator, "tideserve_autoscaler_desired_replicas") >= 3
    assert sample(operator, "tideserve_autoscaler_decisions_total", action="scale-up", reason="Demand") >= 1
    assert sample(operator, "tideserve_autoscaler_request_rate") > 100
    # The deployment's SLO and its conditions as the status holds them, reconcile's included (for alerts).
    assert sample(operator, "tideserve_autoscaler_slo_target_seconds", kind="ttft") == 2.0
    assert sample(operator, "tideserve_autoscaler_condition", condition="MetricsStale") == 0
    assert sample(operator, "tideserve_autoscaler_condition", condition="SLOMet") == 1
    assert sample(operator, "tideserve_autoscaler_condition", condition="CapacityLimited") == 0
    await eventually(lambda: sample(operator, "tideserve_autoscaler_batch_limit_pushes_total", result="ok") >= 2)

    # Autoscaling off: the pods get the spec's limits back and the loop's status goes.
    await request(api, "PATCH", f"{BASE}/{NAME}", {"spec": {"autoscaling": {"mode": "off"}}})
    await eventually(lambda: a.limits == b.limits == (256, 8192))
    await eventually(lambda: "autoscaling" not in status(api)
                     and status(api)["batchLimits"] == {"maxNumSeqs": 256, "maxNumBatchedTokens": 8192})
    assert not {"SLOMet", "MetricsStale"} & {c["type"] for c in status(api)["conditions"]}
    assert requests_as_rbac(api) <= WORKLOAD | CRD_DISCOVERY, requests_as_rbac(api) - (WORKLOAD | CRD_DISCOVERY)


async def test_a_pod_that_only_carries_the_labels_gets_no_token_and_no_say(api, operator, fake_pods):
    """Anyone who may create pods can copy the worker labels: only pods of the Deployment's own ReplicaSet count."""
    fake_pods.admin_token = lambda: admin_token(api)
    worker, intruder = await fake_pods.add("chat-a"), await fake_pods.add("chat-intruder")
    intruder.load = 5000  # it would ask for the maximum if it were heard
    intruder.ttft, intruder.tpot = 30.0, 2.0
    await add_pod(api, "chat-a", worker)
    await add_pod(api, "chat-intruder", intruder, owned=False)
    await create(api, llmdeployment(maxReplicas=4))
    await eventually(lambda: worker.scrapes >= 3, timeout=20)
    await eventually(lambda: worker.puts)  # the loop runs and pushes limits, to its own pod only
    assert intruder.scrapes == 0 and intruder.authorizations == []
    assert api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 1  # the idle worker is all there is
    assert status(api)["autoscaling"]["readyReplicas"] == 1


async def test_metrics_through_prometheus_drive_the_same_decisions(api, tmp_path, fake_pods):
    url = await fake_pods.start_prometheus()
    running = await RunningOperator(write_kubeconfig(tmp_path / "kubeconfig", str(api.url)),
                                    AutoscalerOptions(prometheus_url=url)).start()
    try:
        a = await fake_pods.add("chat-a")
        a.load = 500
        await add_pod(api, "chat-a", a)
        await create(api, llmdeployment(maxReplicas=3))
        await eventually(lambda: api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 3, timeout=20)
        assert spec_writes(api)[0].data["spec"] == {"replicas": 3}
        assert '{__name__=~"vllm:.+|tideserve_.+",namespace="default",pod=~"chat-a"}' in fake_pods.prometheus_queries
        await eventually(lambda: condition(api, "MetricsStale").get("status") == "False")
        assert status(api)["autoscaling"]["load"]["requestRate"] > 100
        assert fake_pods.direct_scrapes == 0 and a.puts  # metrics from Prometheus; limits still to the pod
    finally:
        await running.shutdown()


async def test_stale_metrics_hold_and_set_metrics_stale(api, operator, fake_pods):
    a = await fake_pods.add("chat-a")
    a.broken, a.load = True, 500  # the load would scale up, if it could be read
    await add_pod(api, "chat-a", a)
    await add_pod(api, "chat-b", port=free_port())  # nothing listens there
    await create(api, llmdeployment())

    stale = await eventually(lambda: "chat-b: no metrics" in condition(api, "MetricsStale").get("message", "")
                             and condition(api, "MetricsStale"))
    assert stale["status"] == "True" and stale["reason"] == "ScrapeFailed"
    assert "chat-a: no metrics" in stale["message"]
    warning = await eventually(lambda: events(api, "MetricsStale"))
    assert warning[0]["type"] == "Warning"
    decision = status(api)["autoscaling"]["lastDecision"]
    assert (decision["action"], decision["reasonCode"]) == ("hold", "MetricsStale")
    assert "SLOMet" not in {c["type"] for c in status(api)["conditions"]}  # nothing measured, nothing claimed
    await asyncio.sleep(2.5)
    assert api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 1 and not spec_writes(api)
    assert len(events(api, "MetricsStale")) == 1  # on the change, not every interval
    assert sample(operator, "tideserve_autoscaler_stale_windows_total") >= 2
    assert not a.puts  # no batch limits from stale data either

    # Metrics come back (the unreachable pod goes away): fresh again after one window to take deltas from.
    await request(api, "DELETE", f"{PODS}/chat-b", content_type="application/json")
    a.broken, a.load = False, 5
    await eventually(lambda: condition(api, "MetricsStale").get("status") == "False", timeout=15)
    assert await eventually(lambda: events(api, "MetricsFresh"))


async def test_pending_pods_stop_further_scale_up(api, operator, fake_pods):
    a = await fake_pods.add("chat-a")
    a.load = 500
    await add_pod(api, "chat-a", a)
    await add_pod(api, "chat-b", unschedulable=True)  # the second replica waits for a GPU
    await create(api, llmdeployment(replicas=2))

    held = await eventually(lambda: status(api).get("autoscaling", {}).get("lastDecision", {}).get("reasonCode")
                            == "CapacityLimited" and status(api)["autoscaling"])
    assert held["pendingReplicas"] == 1 and held["desiredReplicas"] == 2
    assert held["lastDecision"]["reason"].startswith("CapacityLimited: 1 new replica(s) still Pending")
    await asyncio.sleep(2.5)
    assert api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 2 and not spec_writes(api)

    # Scheduled and ready: scale-up resumes.
    await request(api, "DELETE", f"{PODS}/chat-b", content_type="application/json")
    b = await fake_pods.add("chat-b")
    await add_pod(api, "chat-b", b)
    await eventually(lambda: api.get(*LLMD, NS, NAME)["spec"]["replicas"] > 2, timeout=15)


async def test_scale_down_drains_the_chosen_pods_first(api, operator, fake_pods):
    for name, running in (("chat-a", 5.0), ("chat-b", 0.0), ("chat-c", 1.0)):
        pod = await fake_pods.add(name)
        pod.load, pod.running = 1, running
        await add_pod(api, name, pod)
    await create(api, llmdeployment(replicas=3))

    await eventually(lambda: api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 1, timeout=20)
    costs = {name: (api.get("", "v1", "pods", NS, name)["metadata"].get("annotations") or {}).get(DELETION_COST_ANNOTATION)
             for name in ("chat-a", "chat-b", "chat-c")}
    assert costs == {"chat-a": None, "chat-b": "-1000", "chat-c": "-1000"}  # the least busy go
    writes = [r for r in api.writes() if not r.headers.get("User-Agent", "").startswith("kmock/")]
    marked = max(i for i, r in enumerate(writes) if r.url.path.startswith(f"{PODS}/chat-") and r.method.value == "PATCH")
    scaled = next(i for i, r in enumerate(writes) if r.url.path == f"{BASE}/{NAME}/scale" and r.method.value == "PATCH")
    assert marked < scaled  # drain marks first, then fewer replicas
    assert await eventually(lambda: any(e["message"].startswith("spec.replicas 3 -> 1: scale down")
                                        for e in events(api, "AutoscaledDown")))


async def test_an_operator_restart_keeps_the_learned_seasonal_profile(api, tmp_path, fake_pods):
    first = await RunningOperator(write_kubeconfig(tmp_path / "kubeconfig", str(api.url))).start()
    try:
        body = llmdeployment(maxReplicas=1, maxStep=1)
        body["spec"]["seasonality"] = {"enabled": True, "periodSeconds": 3600, "leadTimeSeconds": 60}
        a = await fake_pods.add("chat-a")
        a.load = 20
        await add_pod(api, "chat-a", a)
        llmd = await create(api, body)
        loop = await eventually(lambda: first.memo.autoscaler.loops.get((NS, NAME)))
        await eventually(lambda: loop.policy and sum(loop.policy.forecaster.daily.counts) >= 3, timeout=15)
    finally:
        await first.shutdown()  # each loop saves its state as it stops

    configmap = api.get(*CONFIGMAP, NS, "chat-autoscaler-state")
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == llmd["metadata"]["uid"]  # garbage-collected with it
    text = configmap["data"]["state.json"]
    assert len(text) < autoscaler_state.MAX_STATE_BYTES
    saved = autoscaler_state.loads(text)["forecaster"]["daily"]
    assert sum(saved["counts"]) >= 3

    second = await RunningOperator(write_kubeconfig(tmp_path / "kubeconfig2", str(api.url)),
                                   AutoscalerOptions(state_save_interval_s=0.5)).start()
    try:
        loop = await eventually(lambda: (l := second.memo.autoscaler.loops.get((NS, NAME))) and l.memory.loaded and l)
        daily = loop.policy.forecaster.daily
        learned = [i for i, count in enumerate(saved["counts"]) if count]
        assert all(daily.counts[i] >= saved["counts"][i] and daily.values[i] is not None for i in learned)
        # It goes on learning from there, and saves periodically.
        await eventually(lambda: sum(daily.counts) > sum(saved["counts"]), timeout=15)
        await eventually(lambda: sum(autoscaler_state.loads(api.get(*CONFIGMAP, NS, "chat-autoscaler-state")["data"]
                                                            ["state.json"])["forecaster"]["daily"]["counts"])
                         > sum(saved["counts"]), timeout=15)
    finally:
        await second.shutdown()
    assert requests_as_rbac(api) <= WORKLOAD | CRD_DISCOVERY, requests_as_rbac(api) - (WORKLOAD | CRD_DISCOVERY)


async def test_a_standby_that_takes_over_reloads_the_learned_state_before_writing_any(api, tmp_path, fake_pods):
    peering = "/apis/kopf.dev/v1/clusterkopfpeerings"
    api.granted = set(chart_rbac("peering.enabled=true"))

    async def peers(lastseen: str) -> None:
        body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "tideserve"},
                "status": {"active-operator": {"priority": 100, "lifetime": 60, "lastseen": lastseen}}}
        if api.get("kopf.dev", "v1", "clusterkopfpeerings", None, "tideserve") is None:
            await request(api, "POST", peering, body, content_type="application/json")
        else:
            await request(api, "PATCH", f"{peering}/tideserve", {"status": body["status"]})

    await peers(now_iso())  # another operator, with a higher priority, is alive and acting
    a = await fake_pods.add("chat-a")
    a.load = 20
    await add_pod(api, "chat-a", a)
    standby = await RunningOperator(write_kubeconfig(tmp_path / "kubeconfig", str(api.url)), AutoscalerOptions(
        state_save_interval_s=0.2, peering=PeeringSettings("tideserve", "standby", priority=0))).start()
    try:
        llmd = await create(api, llmdeployment())
        loop = await eventually(lambda: standby.memo.autoscaler.loops.get((NS, NAME)))
        await asyncio.sleep(2.5)  # a few intervals as a standby
        assert loop.policy is None and not spec_writes(api)
        # Meanwhile the active operator saved what it learned.
        learned = TideservePolicy(policy_config(defaulted(llmd)["spec"]))
        learned.startup_s = 777.0
        await request(api, "POST", f"/api/v1/namespaces/{NS}/configmaps",
                      autoscaler_state.state_configmap(llmd, autoscaler_state.dumps(learned.state_dict())),
                      content_type="application/json")
        await peers("2020-01-01T00:00:00Z")  # it died: the standby takes over
        taken = await eventually(lambda: loop.policy is not None and loop.memory.loaded and loop.policy)
        assert 700 < taken.startup_s <= 777.0  # the saved state, not the one it had when it started
    finally:
        await standby.shutdown()
    configmap_writes = [w for w in api.writes() if "/configmaps" in w.url.path
                        and not w.headers.get("User-Agent", "").startswith("kmock/")]
    for write in configmap_writes:  # whatever it saved after taking over builds on the loaded state
        saved = autoscaler_state.loads(write.data["data"][autoscaler_state.STATE_KEY])
        assert saved["startup_s"] > 700


async def test_advisory_only_reports_then_off_removes_the_loop_and_deletion_is_not_blocked(api, operator, fake_pods):
    a = await fake_pods.add("chat-a")
    a.load = 500
    await add_pod(api, "chat-a", a)
    await create(api, llmdeployment(mode="advisory"))

    advice = await eventually(lambda: status(api).get("autoscaling", {}).get("desiredReplicas", 1) > 1
                              and status(api)["autoscaling"])
    assert advice["mode"] == "advisory" and advice["lastDecision"]["applied"] is False
    assert "batchLimits" not in advice and status(api)["batchLimits"] == {"maxNumSeqs": 256, "maxNumBatchedTokens": 8192}
    assert (await eventually(lambda: events(api, "ScaleRecommended")))[0]["message"].startswith("advisory: 1 -> 3")
    await asyncio.sleep(1.5)
    assert api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 1 and not spec_writes(api) and not a.puts

    await request(api, "PATCH", f"{BASE}/{NAME}", {"spec": {"autoscaling": {"mode": "off"}}})
    await eventually(lambda: "autoscaling" not in status(api))
    assert not {"SLOMet", "MetricsStale"} & {c["type"] for c in status(api)["conditions"]}
    await eventually(lambda: (NS, NAME) not in operator.memo.autoscaler.loops
                     or operator.memo.autoscaler.loops[(NS, NAME)].task.done())
    assert sample(operator, "tideserve_autoscaler_desired_replicas") is None  # its series are gone too

    await request(api, "PATCH", f"{BASE}/{NAME}", {"spec": {"autoscaling": {"mode": "active"}}})
    loop = await eventually(lambda: (l := operator.memo.autoscaler.loops.get((NS, NAME))) and not l.task.done() and l)
    await eventually(lambda: api.get(*CONFIGMAP, NS, "chat-autoscaler-state"))  # saved when the first loop stopped
    await request(api, "DELETE", f"{BASE}/{NAME}", content_type="application/json")
    assert api.get(*LLMD, NS, NAME) is None and api.get(*CONFIGMAP, NS, "chat-autoscaler-state") is None
    await eventually(lambda: loop.task.done())


class FakeRouter(FakePod):
    """A router pod's /metrics: the real tideserve_router_* series, with `held` requests in its hold queue."""

    def __init__(self, name: str):
        super().__init__(name)
        from tideserve.router.server import RouterMetrics

        self.router_metrics = RouterMetrics()
        self.held = 0

    def scrape(self) -> bytes:
        self.router_metrics.held.set(self.held)
        return generate_latest(self.router_metrics.registry)


async def add_router_pod(api, name: str, pod: FakeRouter, owned: bool = True) -> None:
    """A ready router pod as the router Deployment's controllers would leave it (owned=False: someone else's pod
    with the router labels)."""
    from tideserve.operator.manifests import router_labels

    labels = router_labels(NAME)
    owner = None
    if owned:
        deployment = await eventually(lambda: api.get(*DEPLOYMENT, NS, f"{NAME}-router"))
        owner = api.get(*REPLICASET, NS, f"{NAME}-router-7c9d") or await request(api, "POST", RS_PATH, {
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": f"{NAME}-router-7c9d", "labels": labels,
                                                                       "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": f"{NAME}-router",
                "uid": deployment["metadata"]["uid"], "controller": True}]},
            "spec": {"selector": {"matchLabels": labels}}}, content_type="application/json")
    await request(api, "POST", PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{NAME}-router-7c9d",
                                          "uid": owner["metadata"]["uid"], "controller": True}] if owner else [],
                     "annotations": {"prometheus.io/port": str(pod.port), "prometheus.io/path": "/metrics"}},
        "spec": {"containers": [{"name": "router", "image": "tideserve-worker:test"}]}}, content_type="application/json")
    await request(api, "PATCH", f"{PODS}/{name}/status", {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "startTime": now_iso(-60),
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now_iso()}]}})


async def test_requests_held_by_the_router_start_the_first_replica_and_idle_returns_to_zero(api, operator, fake_pods):
    await create(api, llmdeployment(replicas=0, minReplicas=0, scaleToZeroAfterSeconds=3))
    stray = await fake_pods.add("impostor", kind=FakeRouter)
    stray.held = 50  # a pod that only copies the router labels has no say
    await add_router_pod(api, "impostor", stray, owned=False)
    router = await fake_pods.add("chat-router-0", kind=FakeRouter)
    await add_router_pod(api, "chat-router-0", router)
    await asyncio.sleep(2)
    assert api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 0  # nothing held: it stays at zero
    assert stray.scrapes == 0
    router.held = 3
    await eventually(lambda: api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 1, timeout=15)
    assert status(api)["autoscaling"]["lastDecision"]["reason"] == "scale from zero 0->1: 3 request(s) held by the router"
    # The replica serves the held requests (they finish), then no request comes: back to zero.
    worker = await fake_pods.add("chat-a")
    await add_pod(api, "chat-a", worker)
    router.held, worker.load = 0, 3
    await eventually(lambda: worker.scrapes >= 2, timeout=15)
    worker.load = 0
    await eventually(lambda: api.get(*LLMD, NS, NAME)["spec"]["replicas"] == 0, timeout=20)
    assert status(api)["autoscaling"]["lastDecision"]["reason"].startswith("scale to zero 1->0: no request for")
    assert router.scrapes >= 2  # read directly from the router pod
