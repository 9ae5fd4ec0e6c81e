"""Finds helm and kubectl as scripts/install-kube-tools.sh installs them (.tools/bin), else on PATH.

Outside CI a missing binary skips the test with the command that installs it; in CI (CI=true) it fails,
so a broken install step can never turn into a silent skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
