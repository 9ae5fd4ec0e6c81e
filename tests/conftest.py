"""Shared fixtures: the built-in tiny model (written once per session) and in-process workers on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from contextlib import contextmanager, suppress

import httpx
import pytest

from tideserve.ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- leaks: nothing a test starts may outlive it ------------------------------------------------------------

LEAK_GRACE_S = float(os.environ.get("TIDESERVE_LEAK_GRACE_S", "15"))  # processes and threads told to stop get this long to finish (a worker drains, then exits)


def _descendants(root: int) -> dict[int, str]:
    """Live (not zombie) descendant processes of `root`: pid -> command line."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with suppress(OSError):
            stat = open(f"/proc/{entry}/stat").read()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parents.setdefault(int(ppid), []).append(int(entry))
    found, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            with suppress(OSError):
                found[child] = open(f"/proc/{child}/cmdline").read().replace("\0", " ").strip()[:200]
            todo.append(child)
    return found


def _listening_ports(pids: list[int]) -> set[int]:
    """TCP ports in LISTEN state on sockets held open by these processes."""
    inodes = set()
    for pid in pids:
        with suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _running() -> tuple[dict[int, str], set[str], set[int]]:
    children = _descendants(os.getpid())
    threads = {f"{t.name} ({t.ident})" for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()}
    return children, threads, _listening_ports([os.getpid(), *children])


def _check_for_leaks(before, what: str) -> None:
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        children, threads, ports = _running()
        leaked = ({p: c for p, c in children.items() if p not in before[0]}, threads - before[1], ports - before[2])
        if not any(leaked) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if any(leaked):
        for pid in leaked[0]:  # so that one leak does not slow or break every test after it
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{what} left running: child processes {leaked[0]}, non-daemon threads {sorted(leaked[1])}, "
                    f"listening ports {sorted(leaked[2])}", pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def no_leaks_per_module(request):
    """Module-scoped fixtures (a shared worker, say) must stop everything they started."""
    before = _running()
    yield
    _check_for_leaks(before, f"module {request.module.__name__}")


@pytest.fixture(autouse=True)
def no_leaks_per_test(request):
    """Set up after the module's fixtures (which may hold a worker for the whole module), torn down after the
    test's own: what it finds then, the test started and did not stop."""
    before = _running()
    yield
    _check_for_leaks(before, request.node.nodeid)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tideserve.worker.builtin_models import resolve_model

    cache = tmp_path_factory.mktemp("model-cache")
    return str(resolve_model("tiny", cache_dir=cache))


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
def run_worker(model_dir: str, api_keys=(), admin_token=None, admin_token_file=None, max_body_bytes=4 * 2**20,
               drain_timeout=30.0, port=None, admin_port=None,
               **engine_kwargs):
    """Start a real worker (engine thread + both uvicorn servers) in a background thread, on free ports unless
    given (a restart on the same ports)."""
    from tideserve.worker.api import ServerState
    from tideserve.worker.async_engine import AsyncEngine
    from tideserve.worker.config import EngineConfig
    from tideserve.worker.engine import LLMEngine
    from tideserve.worker.server import serve

    engine_kwargs.setdefault("max_model_len", 256)
    engine_kwargs.setdefault("num_kv_blocks", 256)
    async_engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=model_dir, served_model_name="tiny", **engine_kwargs)))
    engine = async_engine.engine
    state = ServerState(api_keys=frozenset(api_keys), admin_token=admin_token, admin_token_file=admin_token_file,
                        max_body_bytes=max_body_bytes)
    port, admin_port = port or free_port(), admin_port or free_port()
    loop = asyncio.new_event_loop()
    errors = []

    def target():
        try:
            loop.run_until_complete(serve(async_engine, state, "127.0.0.1", port, "127.0.0.1", admin_port, drain_timeout,
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
                headers={"Authorization": f"Bearer {state.current_admin_token()}"} if state.current_admin_token() else {},
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
