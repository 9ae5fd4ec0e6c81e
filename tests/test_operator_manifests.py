"""The pure core of the operator: manifests from a spec, the three-way patch, status from observed objects."""

from __future__ import annotations

import copy
import datetime
import glob

import kubernetes_validate
import pytest
import yaml

from kube_tools import SUPPORTED_KUBERNETES
from tideserve.operator import manifests, patching, status
from tideserve.operator.resource import defaulted

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
CONFIG = manifests.OperatorConfig()


def llmd(path: str = "examples/minimal.yaml", **spec_changes) -> dict:
    with open(path) as f:
        obj = yaml.safe_load(f)
    obj["metadata"].update(namespace=obj["metadata"].get("namespace", "default"), uid="uid-1", generation=3)
    obj["spec"].update(spec_changes)
    return defaulted(obj)


def worker(obj: dict) -> dict:
    return manifests.build_deployment(obj, CONFIG)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("path", sorted(glob.glob("examples/*.yaml")))
def test_generated_manifests_pass_strict_kubernetes_validation(path, version):
    obj = llmd(path)
    for manifest in (manifests.build_deployment(obj, CONFIG), manifests.build_service(obj),
                     manifests.build_pod_disruption_budget(obj), manifests.build_admin_secret(obj, "t0ken"),
                     manifests.build_router_deployment(obj, CONFIG), manifests.build_worker_service(obj),
                     manifests.build_router_pod_disruption_budget(obj)):
        if manifest is not None:
            kubernetes_validate.validate(patching.with_last_applied(manifest), version, strict=True)


def test_worker_pod_is_restricted_and_drains():
    obj = llmd("examples/full.yaml")
    pod = manifests.build_deployment(obj, CONFIG)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    drain = obj["spec"]["engine"]["drainTimeoutSeconds"]
    assert container["args"][container["args"].index("--drain-timeout") + 1] == str(drain)
    assert pod["terminationGracePeriodSeconds"] > drain + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Writable scratch only in emptyDirs: /tmp (HOME), the model cache, /dev/shm in memory.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/tmp"] == "tmp" and "emptyDir" in volumes["tmp"]
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= obj["spec"]["engine"]["startupTimeoutSeconds"]


def test_gpus_type_and_overrides_reach_the_pod():
    obj = llmd("examples/full.yaml")
    pod = manifests.build_deployment(obj, CONFIG)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "cloud.google.com/gke-spot": "false"}
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert len(pod["tolerations"]) == 2
    assert pod["serviceAccountName"] == "llm-worker" and pod["priorityClassName"] == "inference-high"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    template = manifests.build_deployment(obj, CONFIG)["spec"]["template"]["metadata"]
    assert template["labels"]["cost-center"] == "ml-platform"
    assert template["labels"]["tideserve.io/llmdeployment"] == "llama-8b"


def test_hf_model_is_downloaded_by_an_init_container_into_a_sized_volume():
    obj = llmd("examples/full.yaml")
    pod = manifests.build_deployment(obj, CONFIG)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["meta-llama/Llama-3.1-8B-Instruct", "main", "/models/model"]
    assert init["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in init["env"]
    assert {v["name"]: v for v in pod["volumes"]}["model"] == {"name": "model", "emptyDir": {"sizeLimit": "40Gi"}}
    assert worker(obj)["args"][:2] == ["--model", "/models/model"]


def test_s3_model_uses_the_aws_cli_image():
    obj = llmd()
    obj["spec"]["model"]["source"] = {"uri": "s3://models/llama", "sizeLimit": "10Gi"}
    (init,) = manifests.build_deployment(obj, CONFIG)["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == CONFIG.s3_download_image
    assert init["args"] == ["s3", "sync", "--only-show-errors", "s3://models/llama", "/models/model"]


def test_api_key_secret_is_a_file_for_tideserve_and_an_env_var_for_vllm():
    obj = llmd("examples/full.yaml")
    assert "--api-key-file" in worker(obj)["args"]
    vllm = llmd("examples/vllm.yaml", apiKeySecret={"name": "keys", "key": "api-keys"})
    env = {e["name"]: e for e in worker(vllm)["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": "api-keys"}}


def test_vllm_worker_follows_the_vllm_openai_conventions():
    obj = llmd("examples/vllm.yaml")
    container = worker(obj)
    args = container["args"]
    assert container["image"] == CONFIG.vllm_image
    for flag, value in [("--served-model-name", "qwen2.5-32b-instruct"), ("--max-model-len", "16384"),
                        ("--max-num-seqs", "64"), ("--max-num-batched-tokens", "4096"), ("--port", "8000"),
                        ("--tensor-parallel-size", "2"), ("--quantization", "awq")]:
        assert args[args.index(flag) + 1] == value
    assert "--admin-port" not in args and [p["name"] for p in container["ports"]] == ["http"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # vLLM has no /ready


def test_quantization_and_the_kv_cache_dtype_reach_either_engine():
    args = worker(llmd("examples/full.yaml"))["args"]
    assert args[args.index("--quantization") + 1] == "int8" and args[args.index("--kv-cache-dtype") + 1] == "fp8"
    vllm = llmd("examples/vllm.yaml")
    vllm["spec"]["engine"]["kvCacheDtype"] = "fp8"
    assert worker(vllm)["args"][worker(vllm)["args"].index("--kv-cache-dtype") + 1] == "fp8"
    plain = worker(llmd())["args"]
    assert "--quantization" not in plain and "--kv-cache-dtype" not in plain


def test_a_tideserve_pod_with_several_gpus_runs_one_rank_per_gpu():
    obj = llmd()
    obj["spec"]["resources"]["gpus"] = 4
    args = worker(obj)["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    obj["spec"]["resources"]["gpus"] = 1
    assert "--tensor-parallel-size" not in worker(obj)["args"]


def test_admin_port_is_on_the_pod_never_on_the_service():
    obj = llmd()
    assert {"name": "admin", "containerPort": 8001, "protocol": "TCP"} in worker(obj)["ports"]
    assert [p["targetPort"] for p in manifests.build_service(obj)["spec"]["ports"]] == ["http"]


def test_pdb_only_with_more_than_one_replica():
    assert manifests.build_pod_disruption_budget(llmd(replicas=1)) is None
    assert manifests.build_pod_disruption_budget(llmd(replicas=2))["spec"]["maxUnavailable"] == 1


# ---- when to apply --------------------------------------------------------------------------------------

def applied(desired: dict) -> dict:
    """The object as the API server would hold it after applying `desired` (plus server-set fields)."""
    observed = patching.with_last_applied(desired)
    observed = copy.deepcopy(observed)
    observed["metadata"].update(resourceVersion="7", uid="child-uid")
    container = observed["spec"]["template"]["spec"]["containers"][0]
    container["terminationMessagePath"] = "/dev/termination-log"  # a server default
    container["resources"]["requests"]["cpu"] = "2000m"  # spelled differently, same quantity
    observed["status"] = {"replicas": 1}
    return observed


def test_unchanged_object_needs_no_apply_despite_server_defaults():
    desired = manifests.build_deployment(llmd(), CONFIG)
    assert not patching.needs_apply(desired, applied(desired))


def test_what_a_mutating_webhook_adds_is_not_drift():
    desired = manifests.build_deployment(llmd(), CONFIG)
    observed = applied(desired)
    pod = observed["spec"]["template"]["spec"]
    pod["containers"][0]["env"] = [*pod["containers"][0].get("env", []), {"name": "INJECTED", "value": "1"}]
    pod["containers"].insert(0, {"name": "mesh-proxy", "image": "proxy:1"})  # a sidecar, even first
    observed["spec"]["template"]["metadata"]["labels"]["policy.example/checked"] = "true"
    assert not patching.needs_apply(desired, observed)


def test_replicas_change_is_an_apply_that_reports_replicas():
    desired = manifests.build_deployment(llmd(), CONFIG)
    observed = applied(desired)
    wanted = manifests.build_deployment(llmd(replicas=4), CONFIG)
    assert patching.needs_apply(wanted, observed)
    assert patching.changed_paths(wanted, observed) == ["spec.replicas"]


def test_a_dropped_field_is_a_new_intent_even_though_nothing_drifted():
    before = llmd()
    before["spec"]["pod"] = {"labels": {"team": "a"}, "priorityClassName": "high"}
    observed = applied(manifests.build_deployment(before, CONFIG))
    wanted = manifests.build_deployment(llmd(), CONFIG)
    assert patching.matches({"spec": wanted["spec"]}, observed)  # the observed object holds all that is wanted
    assert patching.needs_apply(wanted, observed)  # but the server must drop what the operator applied before
    assert patching.changed_paths(wanted, observed) == ["spec.template"]


def test_drift_is_corrected():
    desired = manifests.build_deployment(llmd(), CONFIG)
    observed = applied(desired)
    observed["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    assert patching.needs_apply(desired, observed)
    assert patching.changed_paths(desired, observed) == ["spec.template.spec"]


def test_quantities_compare_by_value():
    assert patching.matches("1", "1000m") and patching.matches("16Gi", "17179869184")
    assert not patching.matches("1", "2") and not patching.matches("http", "https")


# ---- status --------------------------------------------------------------------------------------------

def deployment(replicas=1, ready=1, updated=1, generation=2, observed=2, conditions=()):
    return {"metadata": {"generation": generation}, "status": {
        "replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated, "observedGeneration": observed,
        "conditions": list(conditions)}}


def conditions(st: dict) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def test_ready_when_rolled_out():
    st = status.compute_status(llmd(), deployment(), [], [], None, NOW)
    assert conditions(st) == {"Ready": ("True", "Available"), "Progressing": ("False", "RolloutComplete"),
                              "Degraded": ("False", "AsExpected"), "CapacityLimited": ("False", "Schedulable")}
    assert st["observedGeneration"] == 3 and st["readyReplicas"] == 1


def test_progressing_until_the_deployment_controller_caught_up():
    st = status.compute_status(llmd(), deployment(observed=1), [], [], None, NOW)
    assert conditions(st)["Progressing"] == ("True", "RollingOut") and conditions(st)["Ready"][0] == "False"


def test_unschedulable_pods_mean_capacity_limited_with_the_scheduler_message():
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes: Insufficient nvidia.com/gpu"}]}}
    st = status.compute_status(llmd(replicas=2), deployment(replicas=2, ready=1, updated=2), [pod], [], None, NOW)
    cond = {c["type"]: c for c in st["conditions"]}["CapacityLimited"]
    assert cond["status"] == "True" and cond["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in cond["message"]


def test_quota_and_crash_loops():
    quota = {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "pods is forbidden: exceeded quota: gpus"}
    st = status.compute_status(llmd(), deployment(ready=0, conditions=[quota]), [], [], None, NOW)
    assert conditions(st)["CapacityLimited"] == ("True", "QuotaExceeded") and conditions(st)["Degraded"][0] == "False"
    crashing = {"metadata": {"name": "p"}, "status": {"phase": "Running", "containerStatuses": [
        {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}}}]}}
    st = status.compute_status(llmd(), deployment(ready=0), [crashing], [], None, NOW)
    assert conditions(st)["Degraded"] == ("True", "CrashLoopBackOff")


def test_transition_time_holds_while_the_status_holds_so_status_is_stable():
    first = status.compute_status(llmd(), deployment(), [], [], None, NOW)
    obj = llmd()
    obj["status"] = first
    later = NOW + datetime.timedelta(hours=1)
    again = status.compute_status(obj, deployment(), [], [], None, later)
    assert status.status_patch(first, again) == {}
    flipped = status.compute_status(obj, deployment(ready=0), [], [], None, later)
    ready = {c["type"]: c for c in flipped["conditions"]}["Ready"]
    assert ready["lastTransitionTime"] == "2026-01-01T13:00:00Z"
    assert status.condition_events(first["conditions"], flipped["conditions"]) == [("Warning", "NotReady", ready["message"])]


def test_foreign_conditions_survive():
    obj = llmd()
    obj["status"] = {"conditions": [{"type": "SLOAttained", "status": "True", "reason": "X", "message": "",
                                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    st = status.compute_status(obj, deployment(), [], [], None, NOW)
    assert [c["type"] for c in st["conditions"]][-1] == "SLOAttained"


def test_scaling_decision_reason_only_from_the_autoscalers_matching_decision():
    obj = llmd()
    obj["status"] = {"autoscaling": {"lastDecision": {"action": "scale-up", "replicas": 3, "reason": "ttft",
                                                      "applied": True}}}
    assert status.scaling_decision(obj, 1, 3, NOW) == {"time": "2026-01-01T12:00:00Z", "from": 1, "to": 3, "reason": "ttft"}
    assert status.scaling_decision(obj, 3, 2, NOW)["reason"] == "spec.replicas changed from 3 to 2"
    obj["status"]["autoscaling"]["lastDecision"]["applied"] = False  # advisory: recorded, not what changed it
    assert status.scaling_decision(obj, 1, 3, NOW)["reason"] == "spec.replicas changed from 1 to 3"