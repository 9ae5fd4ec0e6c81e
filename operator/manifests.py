"""Desired state: the Deployment, Service, PodDisruptionBudget and admin-token Secret one LLMDeployment stands for.

Pure functions of a defaulted LLMDeployment (resource.defaulted) and the operator's settings; no I/O.
Manifests never contain None: a field the operator stops setting is removed by the three-way patch in
patching.py, which remembers what was applied last.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import kopf

from tideserve.operator.resource import KIND

API_PORT = 8000
ADMIN_PORT = 8001
CONTAINER_NAME = "worker"
MODEL_MOUNT = "/models"
MODEL_DIR = "/models/model"
API_KEYS_MOUNT = "/var/run/secrets/tideserve"
ADMIN_TOKEN_MOUNT = "/var/run/secrets/tideserve-admin"
ADMIN_TOKEN_KEY = "token"
TIDESERVE_CACHE = "/var/cache/tideserve"
WORKER_UID = 10001  # the non-root user of Dockerfile.worker; also forced on the vllm image, which defaults to root

# Long enough for the Service's endpoints to drop a terminating pod everywhere (kube-proxy, ingress
# controllers) before SIGTERM starts the drain; otherwise new requests still arrive and get 503.
PRESTOP_SLEEP_SECONDS = 5
# After the drain deadline the worker aborts what is left and exits; this margin covers that and the exit.
TERMINATION_MARGIN_SECONDS = 10
STARTUP_PROBE_PERIOD_SECONDS = 10

SELECTOR_LABEL = "tideserve.io/llmdeployment"
ROUTER_LABEL = "tideserve.io/router"  # router pods carry this one, not SELECTOR_LABEL: they are not workers
ROUTER_CONTAINER_NAME = "router"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "tideserve-operator"

# GPU feature discovery (NVIDIA GPU operator) labels each GPU node with nvidia.com/gpu.product.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCTS = {
    "nvidia-t4": "Tesla-T4",
    "nvidia-l4": "NVIDIA-L4",
    "nvidia-a10g": "NVIDIA-A10G",
    "nvidia-a100-40gb": "NVIDIA-A100-SXM4-40GB",
    "nvidia-a100-80gb": "NVIDIA-A100-SXM4-80GB",
    "nvidia-h100-80gb": "NVIDIA-H100-80GB-HBM3",
    "nvidia-h200": "NVIDIA-H200",
}
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class OperatorConfig:
    """Images the operator fills in when an LLMDeployment does not name one."""
    tideserve_image: str = "tideserve-worker:0.1.0"
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    s3_download_image: str = "amazon/aws-cli:2.27.0"
    # The chart creates it in every namespace the operator watches, with read access to EndpointSlices.
    router_service_account: str = "tideserve-router"


def object_labels(name: str) -> dict[str, str]:
    # No app.kubernetes.io/instance: Argo CD's label tracking uses that key, and a child labelled with the
    # Argo CD application's name would be pruned as an object missing from Git.
    return {
        "app.kubernetes.io/name": "tideserve-worker",
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "tideserve",
        MANAGED_BY_LABEL: MANAGED_BY,
        SELECTOR_LABEL: name,
    }


def selector_labels(name: str) -> dict[str, str]:
    return {SELECTOR_LABEL: name}


def router_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tideserve-router", "app.kubernetes.io/component": "router",
            "app.kubernetes.io/part-of": "tideserve", MANAGED_BY_LABEL: MANAGED_BY, ROUTER_LABEL: name}


def router_selector_labels(name: str) -> dict[str, str]:
    return {ROUTER_LABEL: name}


def router_name(name: str) -> str:
    return f"{name}-router"


def worker_service_name(name: str) -> str:
    """The headless Service whose EndpointSlices list the worker pods for the router."""
    return f"{name}-workers"


def router_enabled(spec: dict[str, Any]) -> bool:
    """spec.router.enabled, by default on for the tideserve engine and off for vLLM (which users often front
    with a gateway of their own)."""
    enabled = (spec.get("router") or {}).get("enabled")
    return spec["engine"]["kind"] == "tideserve" if enabled is None else bool(enabled)


def label_selector(name: str) -> str:
    """The pods' selector in string form (status.selector, the scale subresource, list queries)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(name).items())


def endpoint_url(llmd: dict[str, Any]) -> str:
    meta = llmd["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{llmd['spec']['service']['port']}/v1"


def _metadata(llmd: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta = {"name": llmd["metadata"]["name"], "namespace": llmd["metadata"]["namespace"],
            "labels": object_labels(llmd["metadata"]["name"])}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _owned(obj: dict[str, Any], llmd: dict[str, Any]) -> dict[str, Any]:
    # Only the owner-reference half of kopf.adopt(): adopt() would also copy the LLMDeployment's labels,
    # GitOps tracking labels included, onto every child (see object_labels).
    kopf.append_owner_reference(obj, owner=llmd)
    return obj


def quantity(value: int | str) -> str:
    return str(value)


def _model_dir(source: dict[str, Any]) -> str:
    return source["path"] if "path" in source else MODEL_DIR


def worker_args(llmd: dict[str, Any]) -> list[str]:
    """Command-line arguments of the worker container (the image's entrypoint runs the server)."""
    spec = llmd["spec"]
    model, engine, resources = spec["model"], spec["engine"], spec["resources"]
    args = ["--model", _model_dir(model["source"]), "--served-model-name", model["name"],
            "--host", "0.0.0.0", "--port", str(API_PORT), "--dtype", model["dtype"]]
    if "maxModelLen" in engine:
        args += ["--max-model-len", str(engine["maxModelLen"])]
    args += ["--max-num-seqs", str(engine["maxNumSeqs"]),
             "--max-num-batched-tokens", str(engine["maxNumBatchedTokens"])]
    if engine["kind"] == "tideserve":
        # The autoscaler reaches the admin port at the pod IP: beyond loopback, so the worker insists on the token.
        args += ["--admin-host", "0.0.0.0", "--admin-port", str(ADMIN_PORT),
                 "--admin-token-file", f"{ADMIN_TOKEN_MOUNT}/{ADMIN_TOKEN_KEY}",
                 "--drain-timeout", str(engine["drainTimeoutSeconds"]),
                 "--device", "cuda" if resources["gpus"] > 0 else "cpu"]
        if model["quantization"] != "none":
            args += ["--quantization", model["quantization"]]
        if resources["gpus"] > 1:  # one rank per GPU of the pod
            args += ["--tensor-parallel-size", str(resources["gpus"])]
        if "apiKeySecret" in spec:
            args += ["--api-key-file", f"{API_KEYS_MOUNT}/{spec['apiKeySecret']['key']}"]
    else:  # vllm: one engine spans the pod's GPUs
        args += ["--tensor-parallel-size", str(resources["gpus"])]
        if model["quantization"] != "none":
            args += ["--quantization", model["quantization"]]
    if engine["kvCacheDtype"] != "auto":
        args += ["--kv-cache-dtype", engine["kvCacheDtype"]]
    return args + list(engine.get("extraArgs", []))


def _worker_env(llmd: dict[str, Any]) -> list[dict[str, Any]]:
    spec = llmd["spec"]
    # HOME on the writable /tmp volume: with a read-only root filesystem, anything the engine or its
    # libraries cache under ~ (triton kernels, torch compile, HF metadata) must go there.
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    if spec["engine"]["kind"] == "tideserve":
        env.append({"name": "TIDESERVE_MODEL_CACHE", "value": f"{TIDESERVE_CACHE}/models"})
    elif "apiKeySecret" in spec:  # vLLM reads its accepted key from this variable; it has no key file option
        secret = spec["apiKeySecret"]
        env.append({"name": "VLLM_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}})
    ours = {item["name"] for item in env}
    return env + [dict(item) for item in spec["engine"].get("env", []) if item["name"] not in ours]


def _restricted_container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _probe(path: str, period: int, failure_threshold: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failure_threshold}


def _worker_container(llmd: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    spec = llmd["spec"]
    engine, resources = spec["engine"], spec["resources"]
    tideserve = engine["kind"] == "tideserve"
    image = engine.get("image") or (config.tideserve_image if tideserve else config.vllm_image)
    ports = [{"name": "http", "containerPort": API_PORT, "protocol": "TCP"}]
    if tideserve:  # the autoscaler's door for live batch limits; never on the Service
        ports.append({"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"})
    requests = {"cpu": quantity(resources["cpu"]), "memory": quantity(resources["memory"])}
    limits = {"memory": quantity(resources["memory"])}
    if resources["gpus"] > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(resources["gpus"])
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}]
    if tideserve:
        mounts.append({"name": "cache", "mountPath": TIDESERVE_CACHE})
        mounts.append({"name": "admin-token", "mountPath": ADMIN_TOKEN_MOUNT, "readOnly": True})
    mounts += _model_mounts(spec["model"]["source"])
    if tideserve and "apiKeySecret" in spec:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    startup_budget = engine["startupTimeoutSeconds"]
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": engine["imagePullPolicy"],
        "args": worker_args(llmd),
        "env": _worker_env(llmd),
        "ports": ports,
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        # The startup probe holds the other two off while weights load, for up to startupTimeoutSeconds.
        "startupProbe": _probe("/health", STARTUP_PROBE_PERIOD_SECONDS,
                               math.ceil(startup_budget / STARTUP_PROBE_PERIOD_SECONDS)),
        "livenessProbe": _probe("/health", 10, 3),
        # vLLM has no /ready; its /health turns healthy only once the engine is up.
        "readinessProbe": _probe("/ready" if tideserve else "/health", 5, 2),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": _restricted_container_security(),
    }


def _model_mounts(source: dict[str, Any]) -> list[dict[str, Any]]:
    if "pvc" in source:
        mount = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
        if source["pvc"].get("subPath"):
            mount["subPath"] = source["pvc"]["subPath"]
        return [mount]
    if "uri" in source:
        return [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}]
    return []


# Runs in the worker image (transformers pulls in huggingface_hub) with the hub reachable for this step only.
HF_DOWNLOAD_SCRIPT = (
    "import sys; from huggingface_hub import snapshot_download; "
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2] or None, local_dir=sys.argv[3])"
)


def _download_container(llmd: dict[str, Any], worker_image: str, config: OperatorConfig) -> dict[str, Any]:
    model = llmd["spec"]["model"]
    source = model["source"]
    uri = source["uri"]
    container: dict[str, Any] = {"name": "model-download"}
    if uri.startswith("hf://"):
        container.update(image=worker_image, command=["python3", "-c", HF_DOWNLOAD_SCRIPT],
                         args=[uri.removeprefix("hf://"), model.get("revision", ""), MODEL_DIR],
                         env=[{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_OFFLINE", "value": "0"},
                              {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}])
    else:  # s3:// (the image's entrypoint is `aws`)
        container.update(image=config.s3_download_image,
                         args=["s3", "sync", "--only-show-errors", uri, MODEL_DIR],
                         env=[{"name": "HOME", "value": "/tmp"}])
    if "credentialsSecret" in source:
        container["envFrom"] = [{"secretRef": {"name": source["credentialsSecret"]["name"]}}]
    container.update(
        imagePullPolicy=llmd["spec"]["engine"]["imagePullPolicy"],
        resources={"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}, {"name": "model", "mountPath": MODEL_MOUNT}],
        securityContext=_restricted_container_security(),
    )
    return container


def _volumes(llmd: dict[str, Any]) -> list[dict[str, Any]]:
    spec = llmd["spec"]
    source = spec["model"]["source"]
    volumes = [{"name": "tmp", "emptyDir": {}},
               {"name": "shm", "emptyDir": {"medium": "Memory",
                                            "sizeLimit": quantity(spec["resources"]["sharedMemory"])}}]
    if spec["engine"]["kind"] == "tideserve":
        volumes.append({"name": "cache", "emptyDir": {}})
        volumes.append({"name": "admin-token", "secret": {"secretName": admin_secret_name(llmd["metadata"]["name"]),
                                                          "defaultMode": 0o440}})
    if "pvc" in source:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source["pvc"]["claimName"],
                                                                   "readOnly": True}})
    elif "uri" in source:
        volumes.append({"name": "model", "emptyDir": {"sizeLimit": quantity(source["sizeLimit"])}})
    if spec["engine"]["kind"] == "tideserve" and "apiKeySecret" in spec:
        volumes.append({"name": "api-keys", "secret": {"secretName": spec["apiKeySecret"]["name"],
                                                       "defaultMode": 0o440}})
    return volumes


def termination_grace_seconds(llmd: dict[str, Any]) -> int:
    return PRESTOP_SLEEP_SECONDS + llmd["spec"]["engine"]["drainTimeoutSeconds"] + TERMINATION_MARGIN_SECONDS


def _pod_spec(llmd: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    spec = llmd["spec"]
    resources, pod = spec["resources"], spec.get("pod", {})
    worker = _worker_container(llmd, config)
    node_selector = {}
    if resources["gpuType"] != "any":
        node_selector[GPU_PRODUCT_LABEL] = GPU_PRODUCTS[resources["gpuType"]]
    node_selector.update(resources.get("nodeSelector", {}))
    tolerations = []
    if resources["gpus"] > 0:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += [dict(t) for t in resources.get("tolerations", [])]
    pod_spec: dict[str, Any] = {
        # Workers never call the Kubernetes API.
        "automountServiceAccountToken": False,
        # Service links would inject <SERVICE>_PORT variables; a Service named "vllm" sets VLLM_PORT, which vLLM
        # reads as its own setting and fails on.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(llmd),
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                            "fsGroup": WORKER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [worker],
        "volumes": _volumes(llmd),
    }
    if "uri" in spec["model"]["source"]:
        pod_spec["initContainers"] = [_download_container(llmd, worker["image"], config)]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if "serviceAccountName" in pod:
        pod_spec["serviceAccountName"] = pod["serviceAccountName"]
    if "priorityClassName" in pod:
        pod_spec["priorityClassName"] = pod["priorityClassName"]
    if pod.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": s["name"]} for s in pod["imagePullSecrets"]]
    return pod_spec


def build_deployment(llmd: dict[str, Any], config: OperatorConfig,
                     annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """`annotations`: of the Deployment itself (which admin token its pods' Secret holds), not of its pods."""
    spec = llmd["spec"]
    name = llmd["metadata"]["name"]
    pod = spec.get("pod", {})
    pod_labels = {**pod.get("labels", {}), **object_labels(name)}
    pod_annotations = {
        **pod.get("annotations", {}),
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
        "prometheus.io/scrape": "true", "prometheus.io/port": str(API_PORT), "prometheus.io/path": "/metrics",
    }
    return _owned({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(llmd, annotations),
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector_labels(name)},
            # Surge, never drop below the desired count: a replacement pod loads its model before an old one
            # goes. With no spare GPU the surge pod stays Pending, which status reports as CapacityLimited.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 5,
            # A rollout is stuck only once a new pod has had its whole startup budget to load the model.
            "progressDeadlineSeconds": spec["engine"]["startupTimeoutSeconds"] + 600,
            "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations},
                         "spec": _pod_spec(llmd, config)},
        },
    }, llmd)


def build_service(llmd: dict[str, Any]) -> dict[str, Any]:
    """The public Service: in front of the router pods when the router is enabled, else of the workers."""
    service, name = llmd["spec"]["service"], llmd["metadata"]["name"]
    selector = router_selector_labels(name) if router_enabled(llmd["spec"]) else selector_labels(name)
    return _owned({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(llmd, service.get("annotations")),
        "spec": {
            "type": service["type"],
            "selector": selector,
            "ports": [{"name": "http", "port": service["port"], "targetPort": "http", "protocol": "TCP"}],
        },
    }, llmd)


def build_worker_service(llmd: dict[str, Any]) -> dict[str, Any] | None:
    """Headless: no cluster IP, no kube-proxy balancing; its EndpointSlices tell the router which worker pods
    are ready and which terminate. None without the router."""
    if not router_enabled(llmd["spec"]):
        return None
    name = llmd["metadata"]["name"]
    return _owned({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**_metadata(llmd), "name": worker_service_name(name)},
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": API_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }, llmd)


def router_args(llmd: dict[str, Any]) -> list[str]:
    spec, name = llmd["spec"], llmd["metadata"]["name"]
    router = spec["router"]
    return ["router", "--endpointslices", worker_service_name(name), "--port", str(API_PORT),
            "--policy", router["policy"], "--hold-max-requests", str(router["holdQueue"]["maxRequests"]),
            "--hold-timeout-seconds", str(router["holdQueue"]["timeoutSeconds"]),
            "--model-name", spec["model"]["name"]]


def build_router_deployment(llmd: dict[str, Any], config: OperatorConfig) -> dict[str, Any] | None:
    """The router pods (the tideserve worker image, which holds the whole package, running `tideserve router`).
    None without the router."""
    spec, name = llmd["spec"], llmd["metadata"]["name"]
    if not router_enabled(spec):
        return None
    router, pod = spec["router"], spec.get("pod", {})
    container = {
        "name": ROUTER_CONTAINER_NAME,
        "image": config.tideserve_image,
        "imagePullPolicy": spec["engine"]["imagePullPolicy"],
        "command": ["tideserve"],
        "args": router_args(llmd),
        "ports": [{"name": "http", "containerPort": API_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "readinessProbe": _probe("/ready", 5, 2),
        "livenessProbe": _probe("/health", 10, 3),
        # As for workers: the Service stops sending new connections before SIGTERM; the open streams then
        # finish (uvicorn's graceful shutdown) within the grace period, which covers the workers' drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": _restricted_container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": config.router_service_account,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(llmd),
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if pod.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": s["name"]} for s in pod["imagePullSecrets"]]
    return _owned({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**_metadata(llmd), "name": router_name(name), "labels": router_labels(name)},
        "spec": {
            "replicas": router["replicas"],
            "selector": {"matchLabels": router_selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 5,
            "template": {"metadata": {"labels": router_labels(name), "annotations": {
                "kubectl.kubernetes.io/default-container": ROUTER_CONTAINER_NAME,
                "prometheus.io/scrape": "true", "prometheus.io/port": str(API_PORT),
                "prometheus.io/path": "/metrics"}},
                "spec": pod_spec},
        },
    }, llmd)


def admin_secret_name(name: str) -> str:
    return f"{name}-admin"


def build_admin_secret(llmd: dict[str, Any], token: str) -> dict[str, Any] | None:
    """The Secret that holds the bearer token of the tideserve workers' admin port (live batch limits), which
    every pod mounts (the autoscaler derives the same token: operator/admin_token.py). None for vLLM workers."""
    if llmd["spec"]["engine"]["kind"] != "tideserve":
        return None
    return _owned({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {**_metadata(llmd), "name": admin_secret_name(llmd["metadata"]["name"])},
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }, llmd)


def build_pod_disruption_budget(llmd: dict[str, Any]) -> dict[str, Any] | None:
    """The workers' budget: one voluntary disruption (node drain) at a time."""
    return _disruption_budget(llmd, llmd["spec"]["replicas"], _metadata(llmd), selector_labels(llmd["metadata"]["name"]))


def build_router_pod_disruption_budget(llmd: dict[str, Any]) -> dict[str, Any] | None:
    spec, name = llmd["spec"], llmd["metadata"]["name"]
    if not router_enabled(spec):
        return None
    metadata = {**_metadata(llmd), "name": router_name(name), "labels": router_labels(name)}
    return _disruption_budget(llmd, spec["router"]["replicas"], metadata, router_selector_labels(name))


def _disruption_budget(llmd, replicas: int, metadata: dict[str, Any], selector: dict[str, str]) -> dict[str, Any] | None:
    """Only with more than one replica: for a single one a budget either protects nothing (maxUnavailable 1) or
    blocks every node drain (minAvailable 1)."""
    if replicas <= 1:
        return None
    return _owned({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata,
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector},
            # A crash-looping pod must not block a node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }, llmd)


def is_owned_by(obj: dict[str, Any], llmd: dict[str, Any]) -> bool:
    return any(ref.get("uid") == llmd["metadata"].get("uid") and ref.get("kind") == KIND
               for ref in obj.get("metadata", {}).get("ownerReferences", []))
