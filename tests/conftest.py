"""Shared fixtures: the built-in tiny model (written once per session) and in-process workers on free ports."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tideserve.worker.builtin_models import resolve_model

    cache = tmp_path_factory.mktemp("model-cache")
    return str(resolve_model("tiny", cache_dir=cache))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningWorker:
    def __init__(self, engine, state, port, admin_port, thread, loop):
        self.engine, self.state, self.thread, self.loop = engine, state, thread, loop
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"

    def metric(self, name: str) -> float:
        """Value of an unlabelled-but-for-model_name sample on /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@contextmanager
def run_worker(model_dir: str, api_keys=(), admin_token=None, max_body_bytes=4 * 2**20, drain_timeout=30.0,
               **engine_kwargs):
    """Start a real worker (engine thread + both uvicorn servers) on free ports in a background thread."""
    from tideserve.worker.api import ServerState
    from tideserve.worker.config import EngineConfig
    from tideserve.worker.engine import LLMEngine
    from tideserve.worker.server import serve

    engine_kwargs.setdefault("max_model_len", 256)
    engine_kwargs.setdefault("num_kv_blocks", 256)
    engine = LLMEngine(EngineConfig(model=model_dir, served_model_name="tiny", **engine_kwargs))
    state = ServerState(api_keys=frozenset(api_keys), admin_token=admin_token, max_body_bytes=max_body_bytes)
    port, admin_port = free_port(), free_port()
    loop = asyncio.new_event_loop()
    errors = []

    def target():
        try:
            loop.run_until_complete(serve(engine, state, "127.0.0.1", port, "127.0.0.1", admin_port, drain_timeout,
                                          "warning"))
        except BaseException as exc:  # surfaced by the fixture below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    worker = RunningWorker(engine, state, port, admin_port, thread, loop)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{worker.url}/ready").status_code == 200 and httpx.get(
                f"{worker.admin_url}/admin/batch-limits",
                headers={"Authorization": f"Bearer {admin_token}"} if admin_token else {},
            ).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if errors or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start: {errors}")
        time.sleep(0.05)
    try:
        yield worker
    finally:
        if state.request_drain is not None:
            loop.call_soon_threadsafe(state.request_drain)
        thread.join(timeout=30)
        assert not thread.is_alive(), "worker did not shut down"
        assert not errors, errors


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    with run_worker(tiny_model_dir) as w:
        yield w
