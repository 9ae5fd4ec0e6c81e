"""What users install: the wheel built from a clean export of this tree, installed non-editable in a fresh
virtual environment, first as the operator image has it (no torch), then as the worker image has it.

Slow (a fresh venv and its dependencies, about two minutes); pip's cache makes the second run faster.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tideserve.ports import free_port
from tideserve.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True, **kwargs)


def export(destination: Path) -> None:
    """The files git would check out (tracked, plus new ones not ignored): no build leftovers, no caches."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def top_level_folders() -> tuple[str, ...]:
    """setup.py's TOP_LEVEL (read, not imported: importing setup.py would run setup())."""
    tree = ast.parse((REPO / "setup.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["TOP_LEVEL"]]
    return ast.literal_eval(value)


def source_modules() -> set[str]:
    """Every module the layout rule puts in the package: tideserve/ and the top-level folders it installs."""
    modules = set()
    for path in (REPO / "tideserve").rglob("*.py"):
        modules.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    for folder in top_level_folders():
        for path in (REPO / folder).rglob("*.py"):
            modules.add("tideserve." + ".".join(path.relative_to(REPO).with_suffix("").parts))
    return {m.removesuffix(".__init__") for m in modules}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("export")
    export(tree)
    dist = tmp_path_factory.mktemp("dist")
    # With build isolation: pip fetches the build backend that pyproject.toml asks for, as on a user's machine.
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist, tree, cwd=dist)
    (built,) = dist.glob("tideserve-*.whl")
    return built


def test_the_wheel_holds_every_module_and_the_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {n.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert source_modules() <= packaged, source_modules() - packaged
    assert not any(n.startswith(("operator/", "worker/", "tests/")) for n in names)  # never top-level
    assert "tideserve/crds/tideserve.io_llmdeployments.yaml" in names
    assert "tideserve/data/demo-llmdeployment.yaml" in names
    assert any(n.startswith("tideserve/data/traces/azure2023/") for n in names)


@pytest.mark.timeout(900)
def test_installed_wheel_runs_every_subcommand_and_serves_a_completion(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    tideserve = venv / "bin" / "tideserve"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TIDESERVE_MODEL_CACHE=str(tmp_path / "models"))
    outside = tmp_path  # never the checkout: its operator/ folder would shadow the stdlib module

    # The operator image: every dependency but torch, then the wheel without dependencies.
    requirements = tmp_path / "requirements-operator.txt"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in zipfile.ZipFile(wheel).namelist()
                                                if n.endswith(".dist-info/METADATA"))).decode()
    deps = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    requirements.write_text("\n".join(d for d in deps if "extra ==" not in d and not d.startswith("torch")))
    run(*pip, "-r", requirements, cwd=outside, env=env)
    run(*pip, "--no-deps", wheel, cwd=outside, env=env)
    installed_at = run(venv / "bin" / "python", "-c", "import tideserve; print(tideserve.__file__)", cwd=outside,
                       env=env).stdout
    assert installed_at.startswith(str(venv)), installed_at  # the wheel's copy, not the checkout
    helped = run(tideserve, "operator", "--help", cwd=outside, env=env).stdout
    assert "--namespace" in helped
    no_torch = run(venv / "bin" / "python", "-c", "import importlib.util, tideserve.operator.main; "
                   "print(importlib.util.find_spec('torch') is None)", cwd=outside, env=env).stdout
    assert no_torch.strip() == "True"

    # The worker image: torch pinned, then the wheel with its dependencies.
    run(*pip, TORCH, wheel, cwd=outside, env=env)
    for command in SUBCOMMANDS:
        result = run(tideserve, command, "--help", cwd=outside, env=env)
        assert f"usage: tideserve {command}" in result.stdout
    assert run(venv / "bin" / "python", "-c", "import torch; print(torch.__version__)", env=env,
               cwd=outside).stdout.startswith("2.13.0")

    port, admin_port = free_port(), free_port()
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([str(tideserve), "serve", "--model", "tiny", "--port", str(port), "--admin-port",
                               str(admin_port)], cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.5)
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert json.loads(response.text)["usage"]["completion_tokens"] == 4
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
