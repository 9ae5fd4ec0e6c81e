"""Runs LLMEngine's step loop in a thread and hands each request's outputs to an asyncio stream."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import AsyncIterator, Callable

from tideserve.worker.engine import LLMEngine, RequestOutput
from tideserve.worker.sequence import SamplingParams

log = logging.getLogger(__name__)

# How long an idle loop sleeps between checks when a static batch is still filling up.
_IDLE_POLL_S = 0.005


class AsyncEngine:
    """The engine is built in the thread that steps it, and no other thread runs torch compute: torch's CPU
    kernels use an OpenMP pool per calling thread, and once two threads own pools (model load in one, steps in
    another) libgomp counts more threads than cores and stops spin-waiting between parallel regions. Its
    threads then sleep and wake at every region: the same 24 requests took 119 s stepped from a second thread
    against 93 s from the thread that loaded the model (docs/engine.md)."""

    def __init__(self, build: Callable[[], LLMEngine]):
        """Start the loop's thread and build the engine there; re-raise what building raised. Steps begin at
        start()."""
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine: LLMEngine | None = None
        self._thread = threading.Thread(target=self._run, args=(build,), name="engine-loop", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started.set()

    def stop(self) -> None:
        self._stop.set()
        self._started.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def wake(self) -> None:
        """Make the loop run a step now (e.g. after new batch limits), even if it was idle."""
        self._wake.set()

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
        self._wake.set()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Raises QueueFullError / PromptTooLongError before
        the first yield. Closing the iterator early (client gone) aborts the request and frees its blocks."""
        request_id = request_id or uuid.uuid4().hex
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            self.engine.submit(request_id, prompt_token_ids, params)
        except Exception:
            del self._streams[request_id]
            raise
        self._wake.set()
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)
                self._wake.set()

    def _run(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = engine = build()
        except BaseException as exc:  # handed to the constructor's caller
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._started.wait()
        while not self._stop.is_set():
            self._wake.clear()
            if not engine.has_work():
                self._wake.wait(0.5)
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a failed step must not leave clients waiting forever
                log.exception("engine step failed")
                outputs = engine.fail_all(f"engine error: {exc}")
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)
            elif not engine.scheduler.running:
                self._wake.wait(_IDLE_POLL_S)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)
