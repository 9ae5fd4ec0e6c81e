"""The Helm chart: `helm lint --strict`, and `helm template` output that passes `kubernetes-validate
--strict` (Kubernetes 1.35 schemas); custom resources are checked against their own CRDs. Plus the RBAC:
exactly the verbs the operator uses, namespaced when namespaces are given."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tideserve.monitoring.prometheus import DASHBOARD_FILE, RULES_FILE
from tideserve.operator import manifests
from tideserve.operator.manifests import OperatorConfig
from tideserve.operator.resource import defaulted

from kube_tools import CHART, SUPPORTED_KUBERNETES, helm, kube_tool, prometheus_operator_errors, render, rules_by_kind

VALUE_SETS = {
    "default": [],
    "cluster-wide": ["--set", "clusterWide=true"],
    "namespaced-with-peering": ["--set", "replicaCount=2", "--set", "watchNamespaces={llm,team-a}"],
    "existing-admin-key": ["--set", "adminKey.existingSecret=my-admin-key", "--set", "adminKey.key=hmac"],
    "prometheus-no-metrics-port": ["--set", "autoscaler.prometheusUrl=http://prometheus.monitoring:9090",
                                   "--set", "metrics.port=0"],
    "monitoring": ["--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
                   "--set", "monitoring.grafanaDashboard.enabled=true", "--set", "monitoring.podMonitor.labels.release=kps",
                   "--set", "watchNamespaces={llm,team-a}"],
}
# A cluster that runs the Prometheus Operator (helm template cannot ask one; helm install asks the cluster).
MONITORING_APIS = ("--api-versions", "monitoring.coreos.com/v1/PodMonitor",
                   "--api-versions", "monitoring.coreos.com/v1/PrometheusRule")


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(values):
    helm("lint", "--strict", CHART, *values)


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_pass_strict_validation(values, version):
    docs = render([*values, *MONITORING_APIS])
    crds = {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {kind for _, kind in crds} == {"LLMDeployment", "ClusterKopfPeering", "KopfPeering"}
    monitoring = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert prometheus_operator_errors(monitoring) == [[] for _ in monitoring]
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        if (group, doc["kind"]) in crds:
            (version,) = crds[group, doc["kind"]]["spec"]["versions"]
            jsonschema.validate(doc, version["schema"]["openAPIV3Schema"])
        elif doc not in monitoring:
            kubernetes_validate.validate(doc, version, strict=True)


# What the operator calls (operator/reconcile.py, the autoscaling loop, and kopf's watches, status patches and
# events), and nothing else.
WORKLOAD = {
    ("tideserve.io/llmdeployments", v) for v in ("get", "list", "watch", "patch")} | {
    ("tideserve.io/llmdeployments/status", "patch"), ("tideserve.io/llmdeployments/finalizers", "update"),
    ("tideserve.io/llmdeployments/scale", "patch")} | {
    ("apps/deployments", v) for v in ("get", "list", "watch", "create", "patch", "delete")} | {("apps/replicasets", "list")} | {
    ("core/services", v) for v in ("get", "list", "watch", "create", "patch", "delete")} | {
    ("policy/poddisruptionbudgets", v) for v in ("get", "list", "watch", "create", "patch", "delete")} | {
    ("core/pods", v) for v in ("list", "watch", "patch")} | {
    ("core/configmaps", v) for v in ("get", "create", "patch")} | {
    ("core/secrets", v) for v in ("create", "patch", "delete")} | {("core/events", "create")}
CRD_DISCOVERY = {("apiextensions.k8s.io/customresourcedefinitions", "list"),
                 ("apiextensions.k8s.io/customresourcedefinitions", "watch")}


def test_the_chart_admits_exactly_the_supported_kubernetes_versions():
    chart = yaml.safe_load(open(f"{CHART}/Chart.yaml"))
    assert chart["kubeVersion"] == f">={SUPPORTED_KUBERNETES[0]}-0"
    for version, admitted in (("1.29.9", False), (SUPPORTED_KUBERNETES[0], True), (SUPPORTED_KUBERNETES[1], True)):
        result = subprocess.run([kube_tool("helm"), "template", "t", CHART, "--kube-version", version],
                                capture_output=True, text=True, timeout=120)
        assert (result.returncode == 0) == admitted, (version, result.stderr)


def test_the_default_install_acts_in_the_release_namespace_only():
    docs = render([])
    namespaces = {("core/namespaces", "list"), ("core/namespaces", "watch")}
    assert rules_by_kind(docs, "ClusterRole") == {"": CRD_DISCOVERY | namespaces}
    assert rules_by_kind(docs, "Role") == {"tideserve": WORKLOAD}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=tideserve" in args and "--all-namespaces" not in args


def test_cluster_wide_and_named_namespaces_exclude_each_other():
    result = subprocess.run([kube_tool("helm"), "template", "t", CHART, "--set", "clusterWide=true",
                             "--set", "watchNamespaces={a}"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "set clusterWide or watchNamespaces, not both" in result.stderr


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses():
    docs = render(VALUE_SETS["cluster-wide"])
    assert rules_by_kind(docs, "ClusterRole") == {"": WORKLOAD | CRD_DISCOVERY}
    assert rules_by_kind(docs, "Role") == {}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--peering") for a in args)


def test_namespaced_rbac_with_peering():
    docs = render(VALUE_SETS["namespaced-with-peering"])
    namespaces = {("core/namespaces", "list"), ("core/namespaces", "watch")}
    assert rules_by_kind(docs, "ClusterRole") == {"": CRD_DISCOVERY | namespaces}
    peering = {("kopf.dev/kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert rules_by_kind(docs, "Role") == {"llm": WORKLOAD | peering, "team-a": WORKLOAD | peering}
    assert {(d["kind"], d["metadata"]["namespace"]) for d in docs if d["kind"] == "KopfPeering"} == {
        ("KopfPeering", "llm"), ("KopfPeering", "team-a")}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"--namespace=llm", "--namespace=team-a", "--peering=tideserve", "--priority=oldest"} <= set(container["args"])
    assert deployment["spec"]["replicas"] == 2
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_operator_arguments_are_accepted_by_tideserve_operator():
    """The chart's args parse with the real CLI, so a renamed flag cannot ship."""
    from tideserve.cli import build_parser

    for values in VALUE_SETS.values():
        (deployment,) = [d for d in render(values) if d["kind"] == "Deployment"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        parsed = build_parser("operator").parse_args(["operator", *args])
        assert parsed.liveness_endpoint == "http://0.0.0.0:8080/healthz"
        ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports.get("metrics", 0) == parsed.metrics_port
    (deployment,) = [d for d in render(VALUE_SETS["prometheus-no-metrics-port"]) if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser("operator").parse_args(["operator", *args])
    assert parsed.prometheus_url == "http://prometheus.monitoring:9090" and parsed.metrics_port == 0
    assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"].get("annotations", {})


def test_the_operator_mounts_its_admin_key_and_no_rule_reads_a_secret():
    """The admin tokens come from a key the operator pod mounts, so no rule of any install reads a Secret."""
    for name, values in VALUE_SETS.items():
        docs = render(values)
        for kind in ("Role", "ClusterRole"):
            for rules in rules_by_kind(docs, kind).values():
                assert not {verb for resource, verb in rules if resource == "core/secrets"} & {"get", "list", "watch"}
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "admin-key"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "admin-key"]
        (flag,) = [a for a in pod["containers"][0]["args"] if a.startswith("--admin-key-file=")]
        (item,) = volume["secret"]["items"]
        assert flag == f"--admin-key-file={mount['mountPath']}/{item['path']}" and mount["readOnly"]
        secrets = [d for d in docs if d["kind"] == "Secret"]
        if name == "existing-admin-key":
            assert volume["secret"]["secretName"] == "my-admin-key" and item["key"] == "hmac" and not secrets
        else:
            (secret,) = secrets
            assert volume["secret"]["secretName"] == secret["metadata"]["name"] == "tideserve-admin-key"
            assert len(secret["data"][item["key"]]) >= 48
            assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def documented_rbac() -> dict[str, set[tuple[str, str]]]:
    """docs/operator.md's RBAC table: (group/resource, verb) by scope."""
    text = open("docs/operator.md").read()
    table = text[text.index("| API group | resource |"):].split("\n\n")[0].splitlines()[2:]
    rows: dict[str, set[tuple[str, str]]] = {}
    for line in table:
        group, resource, verbs, scope, _why = (cell.strip() for cell in line.strip("|").split("|"))
        rows.setdefault(scope, set()).update((f"{group}/{resource}", v.strip()) for v in verbs.split(","))
    return rows


def test_the_documented_rbac_table_is_what_the_chart_renders():
    rows = documented_rbac()
    cluster, workload = rows["cluster"], rows["workload"]
    assert workload == WORKLOAD
    default = render([])
    assert rules_by_kind(default, "ClusterRole") == {"": cluster | rows["cluster, namespaced installs"]}
    assert rules_by_kind(default, "Role") == {"tideserve": workload}
    peered = render(VALUE_SETS["namespaced-with-peering"])
    assert rules_by_kind(peered, "Role")["llm"] == workload | rows["peering, namespaced installs"]
    wide = render(["--set", "clusterWide=true", "--set", "replicaCount=2"])
    assert rules_by_kind(wide, "ClusterRole") == {"": cluster | workload | rows["peering, clusterWide"]}
    # The router's ServiceAccount reads EndpointSlices and nothing else, wherever LLMDeployments run.
    router = rows["router"]
    assert rules_by_kind(default, "Role", router=True) == {"tideserve": router}
    assert rules_by_kind(peered, "Role", router=True) == {"llm": router, "team-a": router}
    assert rules_by_kind(wide, "Role", router=True) == {"tideserve": router}
    listed = render(["--set", "clusterWide=true", "--set", "router.namespaces={llm,ml}"])
    assert rules_by_kind(listed, "Role", router=True) == {"llm": router, "ml": router}
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in listed if d["kind"] == "ServiceAccount"}
    assert {("llm", "tideserve-router"), ("ml", "tideserve-router")} <= accounts
    bindings = [d for d in listed if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-router")]
    assert {(b["metadata"]["namespace"], b["subjects"][0]["name"], b["subjects"][0]["namespace"]) for b in bindings} == {
        ("llm", "tideserve-router", "llm"), ("ml", "tideserve-router", "ml")}


# --- monitoring: Prometheus Operator objects and the Grafana dashboard ---------------------------------------


def monitoring_docs(values=VALUE_SETS["monitoring"], apis=MONITORING_APIS) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render([*values, *apis])
            if d["kind"] in ("PodMonitor", "PrometheusRule") or d["metadata"]["name"].endswith("-dashboard")}


def test_monitoring_is_off_by_default_and_needs_the_prometheus_operator_api():
    assert monitoring_docs([]) == {}
    without_api = monitoring_docs(apis=())
    assert list(without_api) == [("ConfigMap", "tideserve-dashboard")]  # a ConfigMap needs no CRD
    assert {kind for kind, _ in monitoring_docs()} == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    # No operator metrics port: nothing to scrape from the operator, the workers still are.
    names = [name for kind, name in monitoring_docs([*VALUE_SETS["monitoring"], "--set", "metrics.port=0"])
             if kind == "PodMonitor"]
    assert names == ["tideserve-workers", "tideserve-routers"]


def test_the_schema_check_refuses_a_broken_pod_monitor():
    """The validator the chart test relies on can fail: a numeric port name and an unknown relabel action."""
    monitor = copy.deepcopy(monitoring_docs()["PodMonitor", "tideserve-workers"])
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8000
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    (errors,) = prometheus_operator_errors([monitor])
    assert "port must be string" in errors[0] and "action must be equal to one of the allowed values" in errors[0]


def test_the_worker_pod_monitor_selects_worker_pods_and_labels_them_as_the_operator_reads_them():
    docs = monitoring_docs()
    workers, operator = docs["PodMonitor", "tideserve-workers"], docs["PodMonitor", "tideserve-operator"]
    for monitor in (workers, operator):
        assert monitor["metadata"]["labels"]["release"] == "kps"
    spec = workers["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["llm", "team-a"]}  # the watched namespaces
    assert monitoring_docs(["--set", "monitoring.podMonitor.enabled=true", "--set", "clusterWide=true"])[
        "PodMonitor", "tideserve-workers"]["spec"]["namespaceSelector"] == {"any": True}
    pod_labels = manifests.object_labels("chat")
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [e["key"] for e in spec["selector"]["matchExpressions"]] == [manifests.SELECTOR_LABEL]
    (endpoint,) = spec["podMetricsEndpoints"]
    llmd = yaml.safe_load(open("examples/minimal.yaml"))
    llmd["metadata"].update(namespace="llm", uid="u1")
    worker = manifests.build_deployment(defaulted(llmd), OperatorConfig())
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert endpoint["port"] in [p["name"] for p in container["ports"]]
    assert endpoint["path"] == worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    # namespace and pod as the operator's --prometheus-url path reads them (chart defaults), and the deployment.
    values = yaml.safe_load(open(f"{CHART}/values.yaml"))["autoscaler"]
    meta = {"__meta_kubernetes_namespace": values["prometheusNamespaceLabel"],
            "__meta_kubernetes_pod_name": values["prometheusPodLabel"],
            "__meta_kubernetes_pod_label_tideserve_io_llmdeployment": "llmdeployment"}
    assert {r["sourceLabels"][0]: r["targetLabel"] for r in endpoint["relabelings"]} == meta
    assert operator["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    # The router pods' monitor: the same labels, the deployment's name from the router label.
    routers = docs["PodMonitor", "tideserve-routers"]["spec"]
    router = manifests.build_router_deployment(defaulted(llmd), OperatorConfig())
    assert routers["selector"]["matchLabels"].items() <= manifests.router_labels("chat").items()
    assert [e["key"] for e in routers["selector"]["matchExpressions"]] == [manifests.ROUTER_LABEL]
    (endpoint,) = routers["podMetricsEndpoints"]
    assert endpoint["port"] in [p["name"] for p in router["spec"]["template"]["spec"]["containers"][0]["ports"]]
    router_meta = {**meta, "__meta_kubernetes_pod_label_tideserve_io_router": "llmdeployment"}
    del router_meta["__meta_kubernetes_pod_label_tideserve_io_llmdeployment"]
    assert {r["sourceLabels"][0]: r["targetLabel"] for r in endpoint["relabelings"]} == router_meta


def test_the_prometheus_rule_is_the_shipped_rules_file_and_passes_promtool(tmp_path):
    rule = monitoring_docs()["PrometheusRule", "tideserve"]
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([kube_tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: 16 rules found" in result.stdout, result.stdout + result.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"TideserveMetricsStale", "TideserveCapacityLimited", "TideserveSLOInfeasible"} <= alerts
    assert {f"Tideserve{k}BudgetBurn{t}" for k in ("TTFT", "TPOT") for t in ("Fast", "Slow")} <= alerts


def test_the_dashboard_config_map_holds_the_shipped_dashboard_for_the_sidecar():
    config_map = monitoring_docs()["ConfigMap", "tideserve-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["tideserve-llmdeployment.json"]) == json.loads(DASHBOARD_FILE.read_text())
    assert Path("docs/grafana-dashboard.json").resolve() == DASHBOARD_FILE.resolve()
