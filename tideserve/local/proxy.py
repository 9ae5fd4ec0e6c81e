"""The local runtime's single endpoint: a streaming reverse proxy that sends each request to the routable
replica with the fewest requests in flight (least outstanding requests), as a cluster's gateway would.

A replica that refuses before answering (connection refused, or 503 because it just began draining) is
retried on another one, so a scale-down never surfaces as a failed request. Once a response has started it
is passed through as is, status and stream alike; a client that disconnects closes the upstream request too,
which cancels it in the worker.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import httpx

from tideserve.local.replicas import WorkerProcess

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
MAX_BODY_BYTES = 16 * 2**20
ATTEMPTS = 3


def pick_least_outstanding(replicas: list[WorkerProcess]) -> WorkerProcess | None:
    routable = [r for r in replicas if r.routable]
    return min(routable, key=lambda r: (r.outstanding, r.created_at)) if routable else None


class Proxy:
    def __init__(self, replicas: Callable[[], list[WorkerProcess]]):
        self._replicas = replicas
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.retried = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                await _plain(send, 413, b'{"error": {"message": "request body too large", "type": "invalid_request_error"}}')
                return
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        path = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        for attempt in range(ATTEMPTS):
            replica = pick_least_outstanding(self._replicas())
            if replica is None:
                if attempt + 1 < ATTEMPTS:
                    await asyncio.sleep(0.5)
                    continue
                await _plain(send, 503, b'{"error": {"message": "no ready replica", "type": "unavailable"}}',
                             retry_after=True)
                return
            replica.outstanding += 1
            try:
                request = self.client.build_request(scope["method"], replica.url + path, headers=headers,
                                                    content=bytes(body))
                try:
                    response = await self.client.send(request, stream=True)
                except httpx.TransportError:
                    self.retried += 1
                    continue
                if response.status_code == 503 and attempt + 1 < ATTEMPTS:  # draining: go elsewhere
                    await response.aclose()
                    self.retried += 1
                    continue
                await self._relay(response, receive, send)
                return
            finally:
                replica.outstanding -= 1

    @staticmethod
    async def _relay(response: httpx.Response, receive, send) -> None:
        async def pump():
            try:
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                        for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except httpx.HTTPError:
                await send({"type": "http.response.body", "body": b""})

        async def disconnected():
            while (await receive())["type"] != "http.disconnect":
                pass

        relay, watch = asyncio.ensure_future(pump()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, watch):
                task.cancel()
            await asyncio.gather(relay, watch, return_exceptions=True)
            await response.aclose()


async def _plain(send, status: int, body: bytes, retry_after: bool = False) -> None:
    headers = [(b"content-type", b"application/json")] + ([(b"retry-after", b"1")] if retry_after else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
