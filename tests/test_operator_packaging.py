"""The images stay consistent with the package: their entry points are real `tideserve` subcommands, they
copy every folder the package is built from, and the operator image leaves torch out."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from tideserve.cli import SUBCOMMANDS, build_parser

DOCKERFILES = ["Dockerfile.worker", "Dockerfile.operator"]


def instruction(dockerfile: str, name: str) -> list[str]:
    text = open(dockerfile).read().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return json.loads(line[len(name) + 1:])


@pytest.mark.parametrize("dockerfile,subcommand", [("Dockerfile.worker", "serve"), ("Dockerfile.operator", "operator")])
def test_entrypoint_is_a_tideserve_subcommand_and_cmd_parses(dockerfile, subcommand):
    entrypoint = instruction(dockerfile, "ENTRYPOINT")
    assert entrypoint == ["tideserve", subcommand] and subcommand in SUBCOMMANDS
    build_parser(subcommand).parse_args([subcommand, *instruction(dockerfile, "CMD")])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_installs_the_wheel_built_from_the_tree(dockerfile):
    """Built as tests/test_wheel.py builds and tests it; the package's sources never reach the image as files."""
    text = open(dockerfile).read()
    assert "pip wheel --no-deps --wheel-dir /dist /src" in text
    assert re.findall(r"^COPY (.*)$", text, re.MULTILINE) == [". /src", "--from=wheel /dist /dist"]
    assert "/dist/tideserve-*.whl" in text
    ignored = open(".dockerignore").read().split()
    assert ignored[ignored.index("*") + 1:][:7] == ["!pyproject.toml", "!setup.py", "!README.md", "!tideserve",
                                                     "!operator", "!worker", "!crds"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_as_non_root(dockerfile):
    assert re.search(r"^USER 10001$", open(dockerfile).read(), re.MULTILINE)


def test_operator_image_installs_the_package_without_torch():
    text = open("Dockerfile.operator").read()
    assert "not d.startswith('torch')" in text and "pip install --no-deps /dist/tideserve-*.whl" in text
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
    assert any(d.startswith("kopf") for d in deps) and any(d.startswith("kubernetes") for d in deps)


def test_building_the_cli_imports_only_the_subcommand_that_runs():
    """The operator image has no torch: parsing `tideserve operator` must not need it, nor the worker."""
    import subprocess
    import sys

    code = ("import sys; from tideserve.cli import build_parser; build_parser('operator'); "
            "print('torch' in sys.modules, 'tideserve.worker.server' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False", "False"]
