"""HTTP layer: the public OpenAI-compatible API and the admin API (live batch limits), both thin over
AsyncEngine. The admin app is served on its own port so the public Service never exposes it."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from tideserve.worker.async_engine import AsyncEngine
from tideserve.worker.engine import PromptTooLongError, QueueFullError, RequestOutput
from tideserve.worker.protocol import (
    APIError,
    BatchLimits,
    ChatCompletionRequest,
    CompletionRequest,
)
from tideserve.worker.sequence import SamplingParams

log = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client is still connected.
_DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    api_keys: frozenset[str] = frozenset()
    admin_token: str | None = None
    admin_token_file: Any = None  # a SecretFile: re-read when it changes; takes precedence over admin_token
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 1
    draining: bool = False
    request_drain: Callable[[], None] | None = None  # set by the server: starts the same drain as SIGTERM
    created: int = field(default_factory=lambda: int(time.time()))

    def current_admin_token(self) -> str | None:
        return self.admin_token_file.value() if self.admin_token_file is not None else self.admin_token


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _bearer_ok(scope, accepted: frozenset[str] | set[str]) -> bool:
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), k) for k in accepted)


class GuardMiddleware:
    """Refuse requests before they reach a route: `check(scope)` returns an APIError or None. Pure ASGI
    (not BaseHTTPMiddleware, which hides client disconnects from the routes)."""

    def __init__(self, app, check: Callable[[dict], APIError | None]):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (error := self.check(scope)) is not None:
            return await _error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over the limit with 413, whether or not they declare a Content-Length."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body exceeds {self.max_bytes} bytes", "request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(too_large)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _error_response(too_large)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error_response(APIError(400, _validation_message(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


async def _parse(request: Request, model_cls):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise APIError(400, _validation_message(exc)) from None


def create_app(engine: AsyncEngine, state: ServerState) -> FastAPI:
    app = FastAPI(title="tideserve worker", docs_url=None, redoc_url=None)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_body_bytes)
    core = engine.engine
    tokenizer = core.tokenizer
    model_name = core.model_name

    def guard(scope) -> APIError | None:
        if scope["path"].startswith("/v1/"):
            if state.api_keys and not _bearer_ok(scope, state.api_keys):
                return APIError(401, "missing or invalid API key", "authentication_error")
            if state.draining and scope["method"] == "POST":
                return APIError(503, "server is draining; retry on another replica", "unavailable")
        return None

    app.add_middleware(GuardMiddleware, check=guard)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error_response(APIError(503, "engine loop is not running", "unavailable"))
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining or not engine.alive:
            return _error_response(APIError(503, "draining" if state.draining else "engine not running", "unavailable"))
        return {"status": "ready", "model": model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": state.created, "owned_by": "tideserve",
                 "max_model_len": core.max_model_len}
            ],
        }

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(400, f"model {name!r} is not served here; available: {model_name!r}",
                           param="model")

    def tokenize(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids
        else:
            ids = prompt
            if any(t < 0 or t >= len(tokenizer) for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return ids

    def params_for(body, prompt_ids: list[int], max_tokens: int | None) -> SamplingParams:
        try:
            core.check_length(len(prompt_ids), max_tokens)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")
        if max_tokens is None:
            max_tokens = core.max_model_len - len(prompt_ids)
        return body.sampling_params(max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await _parse(request, CompletionRequest)
        check_model(body.model)
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        jobs = []
        for prompt in prompts:
            ids = tokenize(prompt)
            jobs.append((ids, params_for(body, ids, body.max_tokens)))
        streams = [await _start(engine, ids, params, state) for ids, params in jobs]
        response_id = f"cmpl-{uuid.uuid4().hex}"
        chunk = lambda index, text, finish: {  # noqa: E731
            "id": response_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
        }
        if body.stream:
            return _sse(request, _stream_chunks(streams, chunk, None, body.include_usage, response_id, model_name,
                                                "text_completion"))
        results = await _collect_all(request, streams)
        return {
            "id": response_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i, (text, finish, _) in enumerate(results)
            ],
            "usage": _usage([r[2] for r in results]),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # jinja template errors (e.g. a role order the template refuses)
            raise APIError(400, f"chat template failed: {exc}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        params = params_for(body, ids, body.requested_max_tokens)
        stream = await _start(engine, ids, params, state)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(index, text, finish):
            delta = {"content": text} if text or finish is None else {}
            return {
                "id": response_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_name, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}],
            }

        if body.stream:
            first = chunk(0, "", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _sse(request, _stream_chunks([stream], chunk, first, body.include_usage, response_id,
                                                model_name, "chat.completion.chunk"))
        (text, finish, last), = await _collect_all(request, [stream])
        return {
            "id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": _usage([last]),
        }

    return app


async def _start(engine: AsyncEngine, ids: list[int], params: SamplingParams, state: ServerState):
    """Submit a request and return its output iterator; queue-full becomes 429 with Retry-After."""
    stream = engine.generate(ids, params)
    try:
        first = await anext(stream)
    except QueueFullError as exc:
        raise APIError(429, str(exc), "rate_limit_exceeded", headers={"Retry-After": str(state.retry_after_s)})
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param="prompt")
    return _prepend(first, stream)


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        async for output in rest:
            yield output
    finally:
        await rest.aclose()


def _raise_if_failed(output: RequestOutput) -> None:
    if output.error:
        raise APIError(500, output.error, "server_error")


def _usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(o.prompt_tokens for o in finals)
    completion = sum(o.completion_tokens for o in finals)
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in finals)},
    }


async def _collect(stream: AsyncIterator[RequestOutput]) -> tuple[str, str, RequestOutput]:
    parts, last = [], None
    async for output in stream:
        _raise_if_failed(output)
        parts.append(output.text)
        last = output
    return "".join(parts), last.finish_reason, last


async def _collect_all(request: Request, streams) -> list[tuple[str, str, RequestOutput]]:
    """Wait for every stream; if the client disconnects first, cancel them (which aborts the requests)."""
    task = asyncio.ensure_future(asyncio.gather(*(_collect(s) for s in streams)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for s in streams:
                await s.aclose()


async def _merge(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (choice index, output)."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for output in stream:
                await queue.put((index, output))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
            else:
                yield index, output
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def _stream_chunks(streams, chunk, first_chunk, include_usage, response_id, model_name, object_name):
    finals = []
    if first_chunk is not None:
        yield first_chunk
    async for index, output in _merge(streams):
        if output.error:
            yield {"error": {"message": output.error, "type": "server_error", "code": 500}}
            return
        if output.text or output.finished:
            yield chunk(index, output.text, output.finish_reason if output.finished else None)
        if output.finished:
            finals.append(output)
    if include_usage:
        yield {"id": response_id, "object": object_name, "created": int(time.time()), "model": model_name,
               "choices": [], "usage": _usage(finals)}


def _sse(request: Request, chunks) -> StreamingResponse:
    async def body():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()  # client gone or done: closing the chain aborts unfinished requests

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_admin_app(engine: AsyncEngine, state: ServerState) -> FastAPI:
    """Live batch limits. Served on the admin port only; optionally behind its own bearer token."""
    app = FastAPI(title="tideserve worker admin", docs_url=None, redoc_url=None)
    _install_error_handlers(app)
    core = engine.engine

    def guard(scope) -> APIError | None:
        token = state.current_admin_token()
        if token and not _bearer_ok(scope, {token}):
            return APIError(401, "missing or invalid admin token", "authentication_error")
        return None

    app.add_middleware(GuardMiddleware, check=guard)

    def snapshot() -> dict:
        scheduler = core.scheduler
        return {
            **core.batch_limits,
            "num_requests_running": len(scheduler.running),
            "num_requests_waiting": len(scheduler.waiting),
            "kv_cache_usage": round(core.block_manager.usage, 4),
            "kv_cache_tokens": len(core.block_manager.blocks) * core.block_manager.block_size,
            "draining": state.draining,
        }

    @app.get("/admin/batch-limits")
    async def get_limits():
        return snapshot()

    @app.put("/admin/batch-limits")
    async def put_limits(request: Request):
        body: BatchLimits = await _parse(request, BatchLimits)
        current = core.batch_limits
        seqs = body.max_num_seqs or current["max_num_seqs"]
        tokens = body.max_num_batched_tokens or current["max_num_batched_tokens"]
        try:
            core.set_batch_limits(seqs, tokens)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        engine.wake()
        return {**snapshot(), "max_num_seqs": seqs, "max_num_batched_tokens": tokens}

    return app
