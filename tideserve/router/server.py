"""The router: one OpenAI-compatible front for the workers of one LLMDeployment (ASGI, served by uvicorn).

Each request goes to the worker tideserve.router.balancer chooses; its response, status and stream alike, is
passed through chunk by chunk, and a client that disconnects closes the upstream request too (which cancels it
in the worker). A worker that refuses before answering (connection refused, or 503 because it just began
draining) is retried on another one, so a scale-down never surfaces as a failed request; once a response has
started nothing is retried.

The router knows its workers from whoever discovers them (`update`): EndpointSlices in a cluster
(tideserve.router.discovery), the local runtime's replica list on one machine. With no routable worker it holds
requests in a bounded queue until one appears (scale from zero): beyond `hold_max_requests` it answers 429, after
`hold_timeout_s` 503, both with Retry-After. The number held is exported, and the autoscaler reads it as demand.

Every `load_refresh_s` the router reads each worker's /metrics (running and waiting requests, KV usage and
capacity) so that load-aware routing also sees requests other router replicas sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from typing import Any, Sequence

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tideserve.autoscaler.scrape import KV_CAPACITY, KV_USAGE, RUNNING, WAITING, MetricsParseError, parse_exposition
from tideserve.buckets import E2E_BUCKETS
from tideserve.router.balancer import TOKEN_BLOCK, Balancer, Choice, WorkerLoad, block_hashes

log = logging.getLogger("tideserve.router")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
MAX_BODY_BYTES = 16 * 2**20
ATTEMPTS = 4  # workers tried for one request before the last refusal is passed on
REASONS = ("prefix", "prefix-spill", "least-loaded", "least-outstanding", "round-robin")
CHARS_PER_TOKEN = 4  # for the tokens-in-flight estimate of text prompts


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A worker as discovery sees it. Only routable ones (ready, not terminating) get new requests."""
    name: str
    url: str
    routable: bool = True


@dataclasses.dataclass(frozen=True)
class HoldQueue:
    max_requests: int = 256
    timeout_s: float = 120.0

    def __post_init__(self):
        if self.max_requests < 0 or self.timeout_s < 0:
            raise ValueError("hold queue maxRequests and timeoutSeconds must be >= 0")


class RouterMetrics:
    """tideserve_router_*: documented in docs/router.md."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("tideserve_router_requests", "Requests received (held ones included).", registry=r)
        self.held = Gauge("tideserve_router_queue_requests",
                          "Requests held because no worker is routable (the autoscaler reads it as demand).",
                          registry=r)
        self.hold_seconds = Histogram("tideserve_router_hold_seconds",
                                      "Time a request waited for a routable worker (0 when one was ready).",
                                      buckets=E2E_BUCKETS, registry=r)
        self.decisions = Counter("tideserve_router_decisions", "Routing decisions by reason.", ["reason"], registry=r)
        self.rejected = Counter("tideserve_router_rejected", "Requests answered by the router itself, by reason "
                                "(queue-full: 429, hold-timeout: 503).", ["reason"], registry=r)
        self.retries = Counter("tideserve_router_retries",
                               "Attempts sent to another worker after a refusal before any response byte.", registry=r)
        self.prefix_blocks = Counter("tideserve_router_prefix_blocks", "Prompt blocks hashed for routing.", registry=r)
        self.prefix_matched_blocks = Counter(
            "tideserve_router_prefix_matched_blocks",
            "Of those, blocks the chosen worker was believed to hold (prefix-hit estimate).", registry=r)
        self.workers = Gauge("tideserve_router_workers", "Routable workers.", registry=r)
        self.in_flight = Gauge("tideserve_router_requests_in_flight", "Requests open to a worker.", registry=r)
        for reason in REASONS:
            self.decisions.labels(reason)
        for reason in ("queue-full", "hold-timeout"):
            self.rejected.labels(reason)


@dataclasses.dataclass
class RoutedRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    hashes: list[bytes]
    prompt_tokens: int  # counted for token-id prompts, estimated from characters for text


def routing_key(path: str, body: bytes) -> tuple[list[bytes], int]:
    """Block hashes of the prompt and its length in tokens, from an OpenAI completions or chat body; ([], 0)
    for anything else (the worker answers malformed bodies)."""
    if not path.startswith(("/v1/completions", "/v1/chat/completions")):
        return [], 0
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return [], 0
    if not isinstance(payload, dict):
        return [], 0
    prompt: Any = payload.get("prompt")
    if isinstance(payload.get("messages"), list):  # the chat history as the template would lay it out
        prompt = "".join(f"<{m.get('role')}>{_content_text(m.get('content'))}\n"
                         for m in payload["messages"] if isinstance(m, dict))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        tokens = len(prompt)
    elif isinstance(prompt, str):
        tokens = len(prompt) // CHARS_PER_TOKEN
    else:
        return [], 0
    return block_hashes(prompt), tokens


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


class Router:
    def __init__(self, policy: str = "prefix", hold: HoldQueue = HoldQueue(), model_names: Sequence[str] = (),
                 load_refresh_s: float = 2.0, metrics: RouterMetrics | None = None, load_factor: float = 1.25):
        self.balancer = Balancer(policy, load_factor)
        self.hold = hold
        self.model_names = list(model_names)
        self.load_refresh_s = load_refresh_s
        self.metrics = metrics or RouterMetrics()
        self.endpoints: dict[str, Endpoint] = {}
        self.loads: dict[str, WorkerLoad] = {}
        self.held = 0
        self.retried = 0
        self._changed = asyncio.Event()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._refresher: asyncio.Task | None = None

    # --- workers ---------------------------------------------------------------------------------------

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """The workers now known; requests held for lack of one are woken."""
        self.endpoints = {e.name: e for e in endpoints}
        for name in list(self.loads):
            if name not in self.endpoints:
                del self.loads[name]
                self.balancer.index.forget(name)
        for e in endpoints:
            self.loads.setdefault(e.name, WorkerLoad(e.name))
        self.metrics.workers.set(len(self.routable()))
        self._changed.set()
        self._changed = asyncio.Event()

    def routable(self, exclude: set[str] = frozenset()) -> list[WorkerLoad]:
        return [self.loads[e.name] for e in self.endpoints.values() if e.routable and e.name not in exclude]

    async def refresh_loads(self) -> None:
        """Each worker's reported running + waiting requests, KV usage and capacity (the prefix index's bound)."""
        async def one(endpoint: Endpoint):
            try:
                response = await self.client.get(f"{endpoint.url}/metrics", timeout=2.0)
                response.raise_for_status()
                metrics = parse_exposition(response.text)
            except (httpx.HTTPError, MetricsParseError):
                return
            load = self.loads.get(endpoint.name)
            if load is None:
                return
            load.reported((metrics.value(RUNNING) or 0.0) + (metrics.value(WAITING) or 0.0))
            load.kv_usage = metrics.value(*KV_USAGE) or 0.0
            capacity = metrics.value(KV_CAPACITY)
            if capacity:
                self.balancer.index.set_capacity(endpoint.name, capacity // TOKEN_BLOCK)

        await asyncio.gather(*(one(e) for e in self.endpoints.values() if e.routable))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.load_refresh_s)
            await self.refresh_loads()

    # --- ASGI ------------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if self.load_refresh_s > 0 and self._refresher is None:
                    self._refresher = asyncio.ensure_future(self._refresh_forever())
                await send({"type": "lifespan.startup.complete"})
            await self.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in ("/health", "/ready"):  # ready with no worker too: requests are held, not refused
            body = {"status": "ok", "routable_workers": len(self.routable()), "held_requests": self.held}
            return await _json(send, 200, body)
        if path == "/metrics":
            return await _plain(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/v1/models" and not self.routable() and self.model_names:
            return await _json(send, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "tideserve"} for m in self.model_names]})
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                return await _error(send, 413, "request body too large", "invalid_request_error")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        hashes, prompt_tokens = routing_key(path, bytes(body))
        full_path = path + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        self.metrics.requests.inc()
        await self._route(RoutedRequest(scope["method"], full_path, headers, bytes(body), hashes, prompt_tokens),
                          receive, send)

    async def _route(self, request: RoutedRequest, receive, send) -> None:
        arrived = time.monotonic()
        deadline = arrived + self.hold.timeout_s
        tried: set[str] = set()
        attempts, held_observed = 0, False
        while True:
            workers = self.routable(exclude=tried)
            if not workers and tried and self.routable():
                # Every routable worker refused once: give discovery a moment to drop the draining ones.
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=0.5)
                tried.clear()
                continue
            if not workers:
                if await self._hold_until_routable(deadline, receive, send):
                    return
                continue
            if not held_observed:
                self.metrics.hold_seconds.observe(time.monotonic() - arrived)
                held_observed = True
            choice = self.balancer.choose(workers, request.hashes, request.prompt_tokens)
            load, endpoint = self.loads[choice.worker], self.endpoints[choice.worker]
            attempts += 1
            prefill = _Prefill(load, self.balancer.uncached_tokens(choice, request.prompt_tokens))
            load.in_flight += 1
            self.metrics.in_flight.inc()
            try:
                upstream = self.client.build_request(request.method, endpoint.url + request.path,
                                                     headers=request.headers, content=request.body)
                try:
                    response = await _unless_client_leaves(self.client.send(upstream, stream=True), receive)
                    if response is None:  # gone before the worker answered (a non-streamed request): cancelled
                        return
                except httpx.TransportError as exc:
                    if attempts >= ATTEMPTS:
                        return await _error(send, 502, f"no worker answered after {attempts} attempts ({exc!r})",
                                            "unavailable", retry_after=1)
                    tried.add(choice.worker)
                    self._count_retry()
                    continue
                if response.status_code == 503 and attempts < ATTEMPTS:  # draining: go elsewhere
                    await response.aclose()
                    tried.add(choice.worker)
                    self._count_retry()
                    continue
                self._sent(choice, request)
                await _relay(response, receive, send, prefill.done)
                return
            finally:
                prefill.done()
                load.in_flight -= 1
                self.metrics.in_flight.dec()

    def _sent(self, choice: Choice, request: RoutedRequest) -> None:
        """Counted once per request, for the attempt whose response goes to the client."""
        self.balancer.sent(choice, request.hashes)
        self.metrics.decisions.labels(choice.reason).inc()
        self.metrics.prefix_blocks.inc(len(request.hashes))
        self.metrics.prefix_matched_blocks.inc(choice.matched_blocks)

    def _count_retry(self) -> None:
        self.retried += 1
        self.metrics.retries.inc()

    async def _hold_until_routable(self, deadline: float, receive, send) -> bool:
        """Wait for a routable worker. Returns True when the request is given up: answered 429 or 503 here, or
        its client gone (a held request whose client left must not take a slot, count as demand or reach a
        worker later)."""
        if self.held >= self.hold.max_requests:
            self.metrics.rejected.labels("queue-full").inc()
            await _error(send, 429, f"no ready worker and {self.held} requests already held", "rate_limit_exceeded",
                         retry_after=max(1, round(self.hold.timeout_s / 4)))
            return True
        remaining = deadline - time.monotonic()
        if remaining > 0:
            self.held += 1
            self.metrics.held.inc()
            changed, gone = asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({changed, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.held -= 1
                self.metrics.held.dec()
                for task in (changed, gone):
                    task.cancel()
                await asyncio.gather(changed, gone, return_exceptions=True)
            if gone.done() and not gone.cancelled():
                return True
        if self.routable():
            return False
        if time.monotonic() < deadline:
            return False
        self.metrics.hold_seconds.observe(self.hold.timeout_s)
        self.metrics.rejected.labels("hold-timeout").inc()
        await _error(send, 503, f"no worker became ready within {self.hold.timeout_s:g} s", "unavailable",
                     retry_after=5)
        return True

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        await self.client.aclose()


class _Prefill:
    """A routed request's share of its worker's queued prefill, counted until the first response chunk that
    carries a token (a stream's first token; a chat stream's role-only opening event does not count) or its end."""

    def __init__(self, load: WorkerLoad, tokens: int):
        self.load, self.tokens = load, tokens
        load.prefill_tokens += tokens

    def done(self, chunk: bytes = b"") -> None:
        if chunk.count(b"data:") == 1 and b'"role"' in chunk:
            return
        self.load.prefill_tokens -= self.tokens
        self.tokens = 0


async def _relay(response: httpx.Response, receive, send, on_chunk=lambda chunk: None) -> None:
    async def pump():
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                on_chunk(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError:
            await send({"type": "http.response.body", "body": b""})

    relay, watch = asyncio.ensure_future(pump()), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (relay, watch):
            task.cancel()
        await asyncio.gather(relay, watch, return_exceptions=True)
        await response.aclose()


async def _unless_client_leaves(call, receive):
    """The call's result, or None (the call cancelled) if the client disconnects first."""
    work, gone = asyncio.ensure_future(call), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            if not task.done():
                task.cancel()
        await asyncio.gather(gone, return_exceptions=True)
    if work.cancelled() or not work.done():
        await asyncio.gather(work, return_exceptions=True)
        return None
    return work.result()


async def _disconnected(receive) -> None:
    """Returns once the client has gone (the request body was read before: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _plain(send, status: int, body: bytes, content_type: str = "application/json",
                 retry_after: int | None = None) -> None:
    headers = [(b"content-type", content_type.encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, body: Any) -> None:
    await _plain(send, status, json.dumps(body).encode())


async def _error(send, status: int, message: str, kind: str, retry_after: int | None = None) -> None:
    await _plain(send, status, json.dumps({"error": {"message": message, "type": kind}}).encode(),
                 retry_after=retry_after)
