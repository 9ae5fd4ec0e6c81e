"""The operator end to end: the real kopf runtime and handlers against the strict kmock API emulator
(tests/kube_fixtures.py), driven the way users, kubectl and the Kubernetes controllers drive a cluster."""

from __future__ import annotations

import base64
import json
import secrets

import pytest
import yaml

from tideserve.operator.admin_token import TOKEN_ANNOTATION, derive_token, token_digest
from kube_fixtures import RunningOperator, api, eventually, fast_key_checks, operator, requests_as_rbac, write_kubeconfig  # noqa: F401

pytestmark = pytest.mark.asyncio

LLMD = ("tideserve.io", "v1alpha1", "llmdeployments")
DEPLOYMENT = ("apps", "v1", "deployments")
SERVICE = ("", "v1", "services")
PDB = ("policy", "v1", "poddisruptionbudgets")
SECRET = ("", "v1", "secrets")
NS = "default"
BASE = f"/apis/tideserve.io/v1alpha1/namespaces/{NS}/llmdeployments"


def example(name: str) -> dict:
    with open(f"examples/{name}.yaml") as f:
        return yaml.safe_load(f)


async def request(api, method: str, path: str, body=None, content_type="application/merge-patch+json") -> dict:
    response = await api.request(method, path, data=json.dumps(body) if body is not None else None,
                                 headers={"Content-Type": content_type})
    assert response.status == 200, await response.text()
    return await response.json()


def condition(obj: dict | None, ctype: str) -> dict:
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if cond["type"] == ctype:
            return cond
    return {}


def operator_writes(api) -> list:
    """Writes sent by the operator and kopf (the test's own requests carry kmock's User-Agent)."""
    return [r for r in api.writes() if not r.headers.get("User-Agent", "").startswith("kmock/")]


def events(api, reason: str | None = None) -> list[dict]:
    posted = [r.data for r in api.writes() if r.url.path.endswith("/events") and r.method == "POST"]
    return [e for e in posted if reason is None or e["reason"] == reason]


async def settled(api, operator, name: str) -> dict:
    """Wait until the operator has written a status for the current generation and then gone quiet."""
    def current():
        llmd = api.get(*LLMD, NS, name)
        return llmd if llmd and llmd.get("status", {}).get("observedGeneration") == llmd["metadata"]["generation"] else None

    await eventually(current)
    await eventually(lambda: not operator.memo.locks[(NS, name)].locked())
    return current()


async def apply_minimal(api, operator) -> dict:
    await request(api, "POST", BASE, example("minimal"), content_type="application/json")
    await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2") and api.get(*SERVICE, NS, "smollm2"))
    return await settled(api, operator, "smollm2")


async def test_apply_creates_an_owned_deployment_and_service(api, operator):
    llmd = await apply_minimal(api, operator)
    dep, svc = api.get(*DEPLOYMENT, NS, "smollm2"), api.get(*SERVICE, NS, "smollm2")
    owner = {"apiVersion": "tideserve.io/v1alpha1", "kind": "LLMDeployment", "name": "smollm2",
             "uid": llmd["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    assert dep["metadata"]["ownerReferences"] == [owner] and svc["metadata"]["ownerReferences"] == [owner]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["selector"] == {"matchLabels": {"tideserve.io/llmdeployment": "smollm2"}}
    pod = dep["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["image"] == "tideserve-worker:test"
    assert worker["args"][:4] == ["--model", "smollm2", "--served-model-name", "smollm2"]
    assert worker["args"][worker["args"].index("--max-num-seqs") + 1] == "64"
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"http": 8000, "admin": 8001}
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health"
    assert worker["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}  # gpus: 0 in this example
    assert pod["securityContext"]["runAsNonRoot"] and worker["securityContext"]["readOnlyRootFilesystem"]
    assert pod["terminationGracePeriodSeconds"] > 120  # longer than the default 120 s drain
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == {"tideserve.io/router": "smollm2"}  # the router in front (test_router_kmock.py)
    assert api.get(*PDB, NS, "smollm2") is None  # one replica: no budget

    status = llmd["status"]
    assert status["selector"] == "tideserve.io/llmdeployment=smollm2"
    assert status["endpoint"] == "http://smollm2.default.svc:8000/v1"
    assert status["batchLimits"] == {"maxNumSeqs": 64, "maxNumBatchedTokens": 2048}
    assert condition(llmd, "Progressing")["status"] == "True"
    assert condition(llmd, "Ready")["status"] == "False"
    # Events are posted by kopf's poster task, shortly after the reconcile.
    await eventually(lambda: {e["message"] for e in events(api, "Created")} == {
        "Secret smollm2-admin created", "Deployment smollm2 created", "Service smollm2 created",
        "Service smollm2-workers created", "Deployment smollm2-router created",
        "PodDisruptionBudget smollm2-router created"})


async def test_workers_admin_port_takes_a_token_derived_from_the_admin_key(fast_key_checks, api, operator):
    """The token in NAME-admin is HMAC(admin key, namespace, name, uid): the operator writes it without reading
    any Secret (the emulator refuses reads the chart does not grant), and a new key rotates it."""
    llmd = await apply_minimal(api, operator)
    secret = api.get(*SECRET, NS, "smollm2-admin")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == llmd["metadata"]["uid"]
    token = base64.b64decode(secret["data"]["token"]).decode()
    key = operator.admin_key_file.read_text()
    assert token == derive_token(key, NS, "smollm2", llmd["metadata"]["uid"]) and len(token) >= 40
    assert derive_token(key, NS, "smollm2", "another-uid") != token  # a recreated object gets another token
    # Neither the token nor the key is copied into metadata (annotations are readable more widely).
    deployment = api.get(*DEPLOYMENT, NS, "smollm2")
    for text in (json.dumps(secret["metadata"]), json.dumps(deployment)):
        assert token not in text and secret["data"]["token"] not in text and key not in text
    assert deployment["metadata"]["annotations"][TOKEN_ANNOTATION] == \
        f"{secret['metadata']['uid']} {token_digest(token)}"
    pod = deployment["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    path = worker["args"][worker["args"].index("--admin-token-file") + 1]
    (mount,) = [m for m in worker["volumeMounts"] if m["name"] == "admin-token"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "admin-token"]
    assert path == f"{mount['mountPath']}/token" and mount["readOnly"]
    assert volume["secret"]["secretName"] == "smollm2-admin"
    # Reconciles keep the token and write no Secret.
    written = len(operator_writes(api))
    await request(api, "PATCH", f"{BASE}/smollm2", {"spec": {"replicas": 2}})
    await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["replicas"] == 2)
    assert not [w for w in operator_writes(api)[written:] if "/secrets/" in w.url.path]
    # A new key (the kubelet updates the mounted file): the Secret gets the new key's token, pods keep running.
    template = api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"]
    new_key = secrets.token_hex(32)
    operator.admin_key_file.write_text(new_key)
    rotated = derive_token(new_key, NS, "smollm2", llmd["metadata"]["uid"])
    await eventually(lambda: base64.b64decode(api.get(*SECRET, NS, "smollm2-admin")["data"]["token"]).decode() == rotated)
    await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2")["metadata"]["annotations"][TOKEN_ANNOTATION]
                     .endswith(token_digest(rotated)))
    assert api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"] == template  # no rollout
    await eventually(lambda: any("admin token of the current admin key" in e["message"] for e in events(api, "Updated")))
    # The vllm engine has no admin port: no token, and the Secret goes.
    await request(api, "PATCH", f"{BASE}/smollm2", {"spec": {"engine": {"kind": "vllm"}, "resources": {"gpus": 1}}})
    await eventually(lambda: api.get(*SECRET, NS, "smollm2-admin") is None)
    await eventually(lambda: "--admin-token-file" not in
                     api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"]["spec"]["containers"][0]["args"])
    await eventually(lambda: TOKEN_ANNOTATION not in api.get(*DEPLOYMENT, NS, "smollm2")["metadata"].get("annotations", {}))
    assert not {verb for resource, verb in requests_as_rbac(api) if resource == "core/secrets"} - {"create", "patch", "delete"}


async def test_a_same_named_secret_of_another_controller_is_not_taken_over(api, operator):
    await request(api, "POST", f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "smollm2-admin", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "theirs", "uid": "0000", "controller": True}]},
        "data": {"token": base64.b64encode(b"theirs").decode()}}, content_type="application/json")
    await request(api, "POST", BASE, example("minimal"), content_type="application/json")
    llmd = await settled(api, operator, "smollm2")
    assert "Secret smollm2-admin: 422" in condition(llmd, "Degraded")["message"]
    assert base64.b64decode(api.get(*SECRET, NS, "smollm2-admin")["data"]["token"]) == b"theirs"
    assert api.get(*DEPLOYMENT, NS, "smollm2") is None  # no pods that would mount someone else's Secret


async def test_writes_use_the_right_content_types_and_never_touch_the_spec(api, operator):
    await apply_minimal(api, operator)
    writes = operator_writes(api)
    assert writes
    children = ("/deployments/", "/services/", "/secrets/", "/poddisruptionbudgets/")
    for write in writes:
        if write.method.value == "PATCH" and any(c in write.url.path for c in children) and \
                write.headers["Content-Type"] == "application/apply-patch+yaml":
            # Children: server-side apply of the whole intent, as the operator's field manager.
            assert write.url.query["fieldManager"] == "tideserve-operator" and write.url.query["force"] == "true"
            assert write.data["apiVersion"] and write.data["kind"] and write.data["metadata"]["name"]
        elif write.method.value == "PATCH":
            # Status.
            assert write.headers["Content-Type"] == "application/merge-patch+json", write
            assert write.url.path.endswith("/status"), write
            assert isinstance(write.data, dict)
        else:
            assert write.headers["Content-Type"] == "application/json", write
    llmd_writes = [w for w in writes if "/llmdeployments/" in w.url.path]
    # Only the status subresource: nothing the operator or kopf does shows up as drift in Git.
    assert llmd_writes and all(w.url.path.endswith("/status") for w in llmd_writes)
    assert "finalizers" not in api.get(*LLMD, NS, "smollm2")["metadata"]


async def test_a_reconcile_with_nothing_to_change_writes_nothing(api, operator, tmp_path):
    await apply_minimal(api, operator)
    await eventually(lambda: len(events(api, "Created")) == 6)  # kopf posts events after the reconcile
    dep = api.get(*DEPLOYMENT, NS, "smollm2")
    before_writes, before_reconciles = len(api.writes()), operator.memo.stats["reconciles"]
    # A change the operator does not manage (another controller's annotation) triggers a full reconcile.
    await request(api, "PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2",
                  {"metadata": {"annotations": {"example.com/touched": "yes"}}})
    await eventually(lambda: operator.memo.stats["reconciles"] > before_reconciles)
    await settled(api, operator, "smollm2")
    assert len(api.writes()) == before_writes + 1  # the test's own patch, nothing else
    assert api.get(*DEPLOYMENT, NS, "smollm2")["metadata"]["annotations"]["example.com/touched"] == "yes"

    # An operator restart resumes every LLMDeployment: a full reconcile each, still no write from it or kopf.
    await operator.shutdown()
    restarted = await RunningOperator(write_kubeconfig(tmp_path / "kubeconfig2", str(api.url))).start()
    try:
        await eventually(lambda: restarted.memo.stats["reconciles"] >= 1)
        await settled(api, restarted, "smollm2")
        assert len(api.writes()) == before_writes + 1
        assert api.get(*DEPLOYMENT, NS, "smollm2")["metadata"]["uid"] == dep["metadata"]["uid"]
    finally:
        await restarted.shutdown()


async def test_spec_change_rolls_out_to_the_deployment(api, operator):
    await apply_minimal(api, operator)
    await request(api, "PATCH", f"{BASE}/smollm2",
                  {"spec": {"engine": {"maxNumSeqs": 16, "extraArgs": ["--no-prefix-caching"]},
                            "pod": {"labels": {"team": "search"}}}})

    def worker_args():
        return api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"]["spec"]["containers"][0]["args"]

    await eventually(lambda: "--no-prefix-caching" in worker_args())
    assert worker_args()[worker_args().index("--max-num-seqs") + 1] == "16"
    llmd = await settled(api, operator, "smollm2")
    assert llmd["status"]["observedGeneration"] == 2
    assert llmd["status"]["batchLimits"]["maxNumSeqs"] == 16
    template = api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "search"

    # Removing fields removes them from the Deployment too (the three-way patch remembers what it set).
    await request(api, "PATCH", f"{BASE}/smollm2", {"spec": {"engine": {"extraArgs": None}, "pod": None}})
    await eventually(lambda: "--no-prefix-caching" not in worker_args())
    template = api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"]
    assert "team" not in template["metadata"]["labels"]
    await eventually(lambda: any(e["message"].startswith("Deployment smollm2 updated: spec.template")
                                 for e in events(api, "Updated")))


async def test_a_deleted_deployment_comes_back(api, operator):
    await apply_minimal(api, operator)
    old_uid = api.get(*DEPLOYMENT, NS, "smollm2")["metadata"]["uid"]
    await request(api, "DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2", content_type="application/json")
    recreated = await eventually(lambda: (d := api.get(*DEPLOYMENT, NS, "smollm2")) and d["metadata"]["uid"] != old_uid and d)
    assert recreated["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["--model", "smollm2"]
    # Secret, Deployment, Service, the router's Deployment, PDB and headless Service, the Deployment again
    await eventually(lambda: len(events(api, "Created")) == 7)
    # The new Deployment has no record of the Secret: the existing one is found (create: 409) and applied, the
    # same Secret with the same token, which the new Deployment records.
    secret = api.get(*SECRET, NS, "smollm2-admin")
    await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2")["metadata"]["annotations"][TOKEN_ANNOTATION]
                     .startswith(secret["metadata"]["uid"]))
    assert [e["message"] for e in events(api, "Created") if "Secret" in e["message"]] == ["Secret smollm2-admin created"]


async def test_a_hand_edited_deployment_is_set_back_but_kubectl_restart_survives(api, operator):
    await apply_minimal(api, operator)
    dep = api.get(*DEPLOYMENT, NS, "smollm2")
    template = dep["spec"]["template"]
    edited_containers = [{**template["spec"]["containers"][0], "args": ["--model", "something-else"]}]
    await request(api, "PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2", {"spec": {
        "replicas": 5,
        "template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}},
                     "spec": {"containers": edited_containers}}}})

    def restored():
        d = api.get(*DEPLOYMENT, NS, "smollm2")
        return d["spec"]["replicas"] == 1 and d["spec"]["template"]["spec"]["containers"][0]["args"][1] == "smollm2" and d

    fixed = await eventually(restored)
    # Not the operator's field: a rollout restart is not reverted.
    assert fixed["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] == "2026-01-01T00:00:00Z"


async def test_scaling_through_the_scale_subresource_reaches_the_deployment(api, operator):
    await apply_minimal(api, operator)
    # What `kubectl scale llmd/smollm2 --replicas=3` sends.
    scale = await request(api, "PATCH", f"{BASE}/smollm2/scale", {"spec": {"replicas": 3}})
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["replicas"] == 3)
    pdb = await eventually(lambda: api.get(*PDB, NS, "smollm2"))
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["metadata"]["ownerReferences"][0]["name"] == "smollm2"
    llmd = await settled(api, operator, "smollm2")
    decision = llmd["status"]["lastScalingDecision"]
    assert (decision["from"], decision["to"], decision["reason"]) == (1, 3, "spec.replicas changed from 1 to 3")
    await eventually(lambda: any("scaled from 1 to 3" in e["message"] for e in events(api, "Scaled")))
    scale = await request(api, "GET", f"{BASE}/smollm2/scale")
    assert scale["status"]["selector"] == "tideserve.io/llmdeployment=smollm2"

    await request(api, "PATCH", f"{BASE}/smollm2/scale", {"spec": {"replicas": 1}})
    await eventually(lambda: api.get(*PDB, NS, "smollm2") is None)
    llmd = await settled(api, operator, "smollm2")
    assert llmd["status"]["lastScalingDecision"]["reason"] == "spec.replicas changed from 3 to 1"  # stale note unused


async def create_worker_pod(api, name: str) -> None:
    """A pod as the ReplicaSet controller would create it: the pod template's labels."""
    template = api.get(*DEPLOYMENT, NS, "smollm2")["spec"]["template"]
    await request(api, "POST", f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
        "spec": template["spec"]}, content_type="application/json")


async def test_pending_unschedulable_pods_make_the_deployment_capacity_limited(api, operator):
    await apply_minimal(api, operator)
    await create_worker_pod(api, "smollm2-abc12")
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    # What the scheduler writes when no node fits.
    await request(api, "PATCH", f"/api/v1/namespaces/{NS}/pods/smollm2-abc12/status", {"status": {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}})
    llmd = await eventually(lambda: condition(api.get(*LLMD, NS, "smollm2"), "CapacityLimited").get("status") == "True"
                            and api.get(*LLMD, NS, "smollm2"))
    limited = condition(llmd, "CapacityLimited")
    assert limited["reason"] == "Unschedulable" and message in limited["message"]
    warning = await eventually(lambda: events(api, "CapacityLimited"))
    assert warning[0]["type"] == "Warning" and message in warning[0]["message"]

    # Scheduled and running: the condition clears.
    await request(api, "PATCH", f"/api/v1/namespaces/{NS}/pods/smollm2-abc12/status", {"status": {
        "phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}})
    await eventually(lambda: condition(api.get(*LLMD, NS, "smollm2"), "CapacityLimited").get("status") == "False")


async def test_ready_once_the_deployment_has_rolled_out(api, operator):
    await apply_minimal(api, operator)
    dep = api.get(*DEPLOYMENT, NS, "smollm2")
    # What the Deployment controller reports once the new pod passes its readiness probe.
    await request(api, "PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2/status", {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": 1, "updatedReplicas": 1,
        "readyReplicas": 1, "availableReplicas": 1}})
    llmd = await eventually(lambda: condition(api.get(*LLMD, NS, "smollm2"), "Ready").get("status") == "True"
                            and api.get(*LLMD, NS, "smollm2"))
    assert llmd["status"]["readyReplicas"] == 1 and llmd["status"]["replicas"] == 1
    assert condition(llmd, "Progressing")["status"] == "False"
    assert condition(llmd, "Degraded")["status"] == "False"
    assert await eventually(lambda: events(api, "Ready"))


async def test_an_invalid_spec_is_reported_and_builds_nothing(api, operator):
    # The CRD's CEL rules stop this on a real server; an older CRD left in place by Helm would not.
    body = example("minimal")
    body["spec"]["autoscaling"] = {"minReplicas": 5, "maxReplicas": 2}
    await request(api, "POST", BASE, body, content_type="application/json")
    llmd = await eventually(lambda: condition(api.get(*LLMD, NS, "smollm2"), "Degraded").get("status") == "True"
                            and api.get(*LLMD, NS, "smollm2"))
    degraded = condition(llmd, "Degraded")
    assert degraded["reason"] == "InvalidSpec" and "spec.autoscaling.minReplicas" in degraded["message"]
    assert api.get(*DEPLOYMENT, NS, "smollm2") is None


async def test_a_deployment_owned_by_someone_else_is_left_alone(api, operator):
    await request(api, "POST", f"/apis/apps/v1/namespaces/{NS}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "smollm2", "labels": {"app": "mine"}}, "spec": {"replicas": 7}},
        content_type="application/json")
    await request(api, "POST", BASE, example("minimal"), content_type="application/json")
    llmd = await eventually(lambda: condition(api.get(*LLMD, NS, "smollm2"), "Degraded").get("reason") == "NameConflict"
                            and api.get(*LLMD, NS, "smollm2"))
    assert "Deployment smollm2 exists and is not owned" in condition(llmd, "Degraded")["message"]
    assert api.get(*DEPLOYMENT, NS, "smollm2")["spec"] == {"replicas": 7}


async def test_deletion_leaves_nothing_behind(api, operator):
    await apply_minimal(api, operator)
    await request(api, "PATCH", f"{BASE}/smollm2/scale", {"spec": {"replicas": 2}})
    await eventually(lambda: api.get(*PDB, NS, "smollm2"))
    await settled(api, operator, "smollm2")
    await request(api, "DELETE", f"{BASE}/smollm2", content_type="application/json")
    # No finalizer: the object goes at once, and garbage collection follows the owner references.
    assert api.get(*LLMD, NS, "smollm2") is None
    for kind in (DEPLOYMENT, SERVICE, PDB):
        assert api.get(*kind, NS, "smollm2") is None
    # The operator notices its children's deletion and does not bring them back.
    await eventually(lambda: not operator.memo.locks.get((NS, "smollm2")) or not operator.memo.locks[(NS, "smollm2")].locked())
    assert api.get(*DEPLOYMENT, NS, "smollm2") is None


async def test_every_request_is_allowed_by_the_charts_rbac(api, operator):
    """The chart's RBAC (tests/test_chart.py pins it) covers every API call of a scenario with all writes."""
    from test_chart import CRD_DISCOVERY, WORKLOAD

    await apply_minimal(api, operator)
    await request(api, "PATCH", f"{BASE}/smollm2/scale", {"spec": {"replicas": 2}})
    await eventually(lambda: api.get(*PDB, NS, "smollm2"))
    await request(api, "PATCH", f"{BASE}/smollm2/scale", {"spec": {"replicas": 1}})
    await eventually(lambda: api.get(*PDB, NS, "smollm2") is None)
    await settled(api, operator, "smollm2")
    used = requests_as_rbac(api)
    assert ("policy/poddisruptionbudgets", "delete") in used
    assert used <= WORKLOAD | CRD_DISCOVERY, used - (WORKLOAD | CRD_DISCOVERY)


async def test_owner_references_need_the_finalizers_grant_under_owner_reference_admission(api, operator):
    """The children set blockOwnerDeletion, which OwnerReferencesPermissionEnforcement admits only with update on
    llmdeployments/finalizers (the chart grants it, so every other test here passes that check). Without it the
    API server refuses every child, and the operator says so in status instead of looping."""
    api.granted.discard(("tideserve.io/llmdeployments/finalizers", "update"))
    await request(api, "POST", BASE, example("minimal"), content_type="application/json")
    llmd = await settled(api, operator, "smollm2")
    assert api.get(*DEPLOYMENT, NS, "smollm2") is None and api.get(*SECRET, NS, "smollm2-admin") is None
    degraded = condition(llmd, "Degraded")
    assert degraded.get("status") == "True" and degraded["reason"] == "ApplyRejected", llmd["status"]
    assert "cannot set blockOwnerDeletion" in degraded["message"]


def injecting_webhook(kind: str, obj: dict) -> None:
    """A mutating admission webhook (a service mesh, a policy engine): a sidecar, an env var and a label on every
    Deployment's pods."""
    if kind != "Deployment":
        return
    template = obj["spec"]["template"]
    template.setdefault("metadata", {}).setdefault("labels", {})["policy.example/checked"] = "true"
    containers = template["spec"]["containers"]
    for container in containers:
        env = container.setdefault("env", [])
        if not any(e["name"] == "INJECTED_BY_WEBHOOK" for e in env):
            env.append({"name": "INJECTED_BY_WEBHOOK", "value": "1"})
    if not any(c["name"] == "mesh-proxy" for c in containers):
        containers.append({"name": "mesh-proxy", "image": "mesh/proxy:1"})


async def test_a_mutating_webhook_on_deployments_converges_in_one_write_per_change(api, operator):
    api.mutate = injecting_webhook
    deployment_path = f"/apis/apps/v1/namespaces/{NS}/deployments/smollm2"

    def deployment_writes() -> int:
        return len([w for w in operator_writes(api) if w.url.path == deployment_path])

    await apply_minimal(api, operator)
    await eventually(lambda: len(events(api, "Created")) == 6)
    assert deployment_writes() == 1
    await request(api, "PATCH", f"{BASE}/smollm2", {"spec": {"engine": {"maxNumSeqs": 32}}})
    await eventually(lambda: deployment_writes() == 2)
    reconciles = operator.memo.stats["reconciles"]
    # The Deployment's own watch event (the write) reconciles again: it finds nothing to change.
    await eventually(lambda: operator.memo.stats["reconciles"] > reconciles)
    await settled(api, operator, "smollm2")
    assert deployment_writes() == 2
    pod = api.get("apps", "v1", "deployments", NS, "smollm2")["spec"]["template"]
    worker, sidecar = pod["spec"]["containers"]
    assert sidecar["name"] == "mesh-proxy" and {"name": "INJECTED_BY_WEBHOOK", "value": "1"} in worker["env"]
    assert worker["args"][worker["args"].index("--max-num-seqs") + 1] == "32"
    assert pod["metadata"]["labels"]["policy.example/checked"] == "true"
