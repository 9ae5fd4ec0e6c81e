"""Worker processes: what pods are in a cluster, one `tideserve serve` process each on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from tideserve.ports import free_port


class WorkerProcess:
    """One replica. `routable` is the router's view: ready and not draining."""

    def __init__(self, name: str, log_dir: Path):
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        self.log_path = log_dir / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.created_at = time.time()
        self.ready_at: float | None = None
        self.draining = False
        self.limits_pushed: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and not self.exited

    @property
    def routable(self) -> bool:
        return self.ready and not self.draining

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.returncode is not None

    async def start(self, args: list[str], threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        log = open(self.log_path, "ab")
        try:
            # Run from the log directory: a working directory that holds the source checkout would put its
            # operator/ folder ahead of the standard library's `operator` module.
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tideserve", "serve", *args, stdout=log, stderr=log, env=env,
                cwd=self.log_path.parent, start_new_session=True)
        finally:
            log.close()

    async def check_ready(self, client: httpx.AsyncClient) -> bool:
        """Poll the readiness endpoint once; marks the replica ready the first time it answers 200."""
        if self.ready_at is not None or self.exited:
            return self.ready
        try:
            response = await client.get(f"{self.url}/ready", timeout=2.0)
        except httpx.HTTPError:
            return False
        if response.status_code == 200:
            self.ready_at = time.time()
        return self.ready_at is not None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def drain(self, timeout_s: float) -> int | None:
        """Stop taking requests, let the worker finish what it holds (its SIGTERM drain), wait for it to exit.
        Kills it if it outlives the drain timeout by more than a grace period. Returns the exit code."""
        self.draining = True
        if self.process is None or self.exited:
            return self.process.returncode if self.process else None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s + 10.0)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            return await self.process.wait()
