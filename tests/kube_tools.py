"""Finds helm and kubectl as scripts/install-kube-tools.sh installs them (.tools/bin), else on PATH.

Outside CI a missing binary skips the test with the command that installs it; in CI (CI=true) it fails,
so a broken install step can never turn into a silent skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

TOOLS_BIN = Path(os.environ.get("TIDESERVE_TOOLS_DIR", Path(__file__).resolve().parents[1] / ".tools")) / "bin"


def kube_tool(name: str) -> str:
    candidate = TOOLS_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found in {TOOLS_BIN} or on PATH; install it with scripts/install-kube-tools.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


# The oldest Kubernetes the chart's kubeVersion admits and the newest schemas kubernetes-validate ships: every
# manifest is validated against both (a field too new for the oldest fails there, as preStop.sleep did on 1.28).
SUPPORTED_KUBERNETES = ("1.30.0", "1.35.0")
CHART = str(Path(__file__).resolve().parents[1] / "charts" / "tideserve")


def helm(*args: str) -> str:
    result = subprocess.run([kube_tool("helm"), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def render(values: list[str]) -> list[dict]:
    out = helm("template", "tideserve", CHART, "--namespace", "tideserve", "--include-crds", *values)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def rules_by_kind(docs: list[dict], kind: str) -> dict[str, set[tuple[str, str]]]:
    """(group/resource, verb) pairs of each Role or ClusterRole, by namespace ("" for cluster roles)."""
    found = {}
    for doc in docs:
        if doc["kind"] == kind:
            key = doc["metadata"].get("namespace", "")
            found[key] = {(f"{group or 'core'}/{resource}", verb) for rule in doc["rules"]
                          for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    return found
