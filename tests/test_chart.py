"""The Helm chart: `helm lint --strict`, and `helm template` output that passes `kubernetes-validate
--strict` (Kubernetes 1.35 schemas); custom resources are checked against their own CRDs. Plus the RBAC:
exactly the verbs the operator uses, namespaced when namespaces are given."""

from __future__ import annotations

import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kube_tools import CHART, SUPPORTED_KUBERNETES, helm, kube_tool, render, rules_by_kind

VALUE_SETS = {
    "default": [],
    "cluster-wide": ["--set", "clusterWide=true"],
    "namespaced-with-peering": ["--set", "replicaCount=2", "--set", "watchNamespaces={llm,team-a}"],
    "existing-admin-key": ["--set", "adminKey.existingSecret=my-admin-key", "--set", "adminKey.key=hmac"],
    "prometheus-no-metrics-port": ["--set", "autoscaler.prometheusUrl=http://prometheus.monitoring:9090",
                                   "--set", "metrics.port=0"],
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(values):
    helm("lint", "--strict", CHART, *values)


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_pass_strict_validation(values, version):
    docs = render(values)
    crds = {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {kind for _, kind in crds} == {"LLMDeployment", "ClusterKopfPeering", "KopfPeering"}
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        if (group, doc["kind"]) in crds:
            (version,) = crds[group, doc["kind"]]["spec"]["versions"]
            jsonschema.validate(doc, version["schema"]["openAPIV3Schema"])
        else:
            kubernetes_validate.validate(doc, version, strict=True)


# What the operator calls (operator/reconcile.py, the autoscaling loop, and kopf's watches, status patches and
# events), and nothing else.
WORKLOAD = {
    ("tideserve.io/llmdeployments", v) for v in ("get", "list", "watch", "patch")} | {
    ("tideserve.io/llmdeployments/status", "patch"), ("tideserve.io/llmdeployments/finalizers", "update"),
    ("tideserve.io/llmdeployments/scale", "patch")} | {
    ("apps/deployments", v) for v in ("get", "list", "watch", "create", "patch")} | {("apps/replicasets", "list")} | {
    ("core/services", v) for v in ("get", "list", "watch", "create", "patch")} | {
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
