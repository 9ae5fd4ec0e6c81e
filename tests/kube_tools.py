"""Finds helm and kubectl as scripts/install-kube-tools.sh installs them (.tools/bin), else on PATH (also
prometheus and promtool, which scripts/install.sh installs), and validates Prometheus Operator objects with the
schemas install-kube-tools.sh puts in .tools/node.

Outside CI a missing tool skips the test with the command that installs it; in CI (CI=true) it fails,
so a broken install step can never turn into a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

TOOLS_DIR = Path(os.environ.get("TIDESERVE_TOOLS_DIR", Path(__file__).resolve().parents[1] / ".tools"))
TOOLS_BIN = TOOLS_DIR / "bin"
PROMETHEUS_OPERATOR_MODELS = TOOLS_DIR / "node" / "node_modules"
SCHEMA_SCRIPT = Path(__file__).resolve().parent / "prometheus_operator_schema.mjs"


def missing(message: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def kube_tool(name: str) -> str:
    candidate = TOOLS_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    installer = "scripts/install.sh" if name.startswith("prom") else "scripts/install-kube-tools.sh"
    missing(f"{name} not found in {TOOLS_BIN} or on PATH; install it with {installer}")


def prometheus_operator_errors(objects: list[dict]) -> list[list[str]]:
    """Per object, what the Prometheus Operator's API schema (monitoring.coreos.com) finds wrong with it."""
    node = shutil.which("node")
    if node is None or not (PROMETHEUS_OPERATOR_MODELS / "@kubernetes-models" / "prometheus-operator").is_dir():
        missing(f"node or {PROMETHEUS_OPERATOR_MODELS}/@kubernetes-models/prometheus-operator missing; "
                "install them with scripts/install-kube-tools.sh")
    result = subprocess.run([node, str(SCHEMA_SCRIPT), str(PROMETHEUS_OPERATOR_MODELS)], input=json.dumps(objects),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# The oldest Kubernetes the chart's kubeVersion admits and the newest schemas kubernetes-validate ships: every
# manifest is validated against both (a field too new for the oldest fails there, as preStop.sleep did on 1.28).
SUPPORTED_KUBERNETES = ("1.30.0", "1.35.0")
CHART = str(Path(__file__).resolve().parents[1] / "charts" / "tideserve")


def helm(*args: str) -> str:
    result = subprocess.run([kube_tool("helm"), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def render(values: list[str] | tuple[str, ...]) -> list[dict]:
    out = helm("template", "tideserve", CHART, "--namespace", "tideserve", "--include-crds", *values)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def rules_by_kind(docs: list[dict], kind: str, router: bool = False) -> dict[str, set[tuple[str, str]]]:
    """(group/resource, verb) pairs of each Role or ClusterRole, by namespace ("" for cluster roles): the
    operator's, or with `router` the router pods' (the roles named *-router)."""
    found = {}
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"].endswith("-router") == router:
            key = doc["metadata"].get("namespace", "")
            found[key] = {(f"{group or 'core'}/{resource}", verb) for rule in doc["rules"]
                          for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    return found
