"""The worker's admin port (live batch limits) fails closed: loopback unless a token guards it, no empty token
file, and a rotated token (a Kubernetes Secret volume updated in place) is taken up by a running worker."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from conftest import run_worker
import yaml

from tideserve.operator import manifests
from tideserve.operator.resource import defaulted
from tideserve.secret_file import SecretFile, SecretFileError


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from tideserve.cli import main; sys.exit(main())",
                           "serve", "--model", "tiny", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd="/")


def test_admin_port_beyond_loopback_without_a_token_refuses_to_start():
    result = serve("--admin-host", "0.0.0.0")
    assert result.returncode == 2, result.stderr
    assert "--admin-host 0.0.0.0 is reachable from other hosts" in result.stderr
    assert "loading" not in result.stderr  # refused before the model is loaded


def test_an_empty_admin_token_file_is_an_error(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = serve("--admin-token-file", str(empty))
    assert result.returncode == 2 and "is empty" in result.stderr, result.stderr
    with pytest.raises(SecretFileError, match="cannot read"):
        SecretFile(tmp_path / "missing")


def test_the_admin_port_defaults_to_loopback_and_pods_bind_it_with_their_token():
    import argparse

    from tideserve.worker.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "tiny"]).admin_host == "127.0.0.1"
    with open("examples/minimal.yaml") as f:
        llmd = defaulted({**yaml.safe_load(f), "metadata": {"name": "m", "namespace": "n", "uid": "u"}})
    args = manifests.worker_args(llmd)
    assert args[args.index("--admin-host") + 1] == "0.0.0.0"
    assert args[args.index("--admin-token-file") + 1] == f"{manifests.ADMIN_TOKEN_MOUNT}/{manifests.ADMIN_TOKEN_KEY}"


def _rotate(directory, token: str, generation: int) -> None:
    """As the kubelet updates a Secret volume: a new data directory, then an atomic swap of the symlink."""
    data = directory / f"..{generation}"
    data.mkdir()
    (data / "token").write_text(token)
    link = directory / "..data.tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")


def test_a_rotated_token_is_accepted_by_a_running_worker(tiny_model_dir, tmp_path):
    volume = tmp_path / "secret"
    volume.mkdir()
    _rotate(volume, "first-token", 1)
    (volume / "token").symlink_to("..data/token")
    with run_worker(tiny_model_dir, admin_token_file=SecretFile(volume / "token")) as w:
        def put(token: str) -> int:
            return httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_num_seqs": 4},
                             headers={"Authorization": f"Bearer {token}"}).status_code

        assert put("first-token") == 200 and put("wrong") == 401
        _rotate(volume, "second-token", 2)
        assert put("second-token") == 200
        assert put("first-token") == 401
        (volume / "..2" / "token").write_text("")  # a half-written update never opens the port
        assert put("second-token") == 200 and put("x") == 401
