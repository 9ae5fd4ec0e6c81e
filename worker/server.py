"""`tideserve serve`: load a model, start the engine loop, serve the public and admin APIs, drain on SIGTERM.

Drain: on SIGTERM (or SIGINT) /ready fails at once and new API requests get 503 while in-flight requests
finish, for up to --drain-timeout seconds; whatever is left is then aborted and the process exits 0 (a SIGTERM
that arrives while the model still loads exits 0 at once: nothing is in flight). Both
servers keep listening during the drain so a load balancer that has not yet seen /ready fail gets a clear
503 rather than a refused connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import time
from pathlib import Path

import uvicorn

log = logging.getLogger("tideserve.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tideserve.worker.config import KV_CACHE_DTYPES, QUANTIZATIONS

    parser.add_argument("--model", required=True, help="local Hugging Face model directory, or a built-in: tiny, smollm2")
    parser.add_argument("--served-model-name", help="name clients use in the `model` field (default: the model's name)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-host", default="127.0.0.1",
                        help="the admin API (batch limits) listens here; beyond loopback only with an admin token")
    parser.add_argument("--admin-port", type=int, default=8001)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                        help="quantize the linear layers' weights at load (behind a quality gate: worker/quantization.py)")
    parser.add_argument("--dense-prefill", action="store_true",
                        help="with int8/int4: also keep the weights dequantized to bfloat16 (2 bytes a weight more) "
                        "for prefill-sized matmuls, where the dense GEMM beats the quantized kernels on CPU")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="fp8: K/V stored in e4m3 with per-token scales (about 4x the float32 tokens per GB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model over this many ranks, one process each (GPUs N.. on CUDA)")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, help="KV pool size in blocks (default: from --kv-cache-memory-gb)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--batching-mode", default="continuous", choices=["continuous", "dynamic", "static"])
    parser.add_argument("--batch-timeout", type=float, default=1.0, help="static mode: max wait for a full batch (s)")
    parser.add_argument("--max-waiting-requests", type=int, default=256, help="beyond this, requests get 429")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20)
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="grace period for in-flight requests (s): a 2,000-token stream at 50 ms per token")
    parser.add_argument("--api-key-file", help="file with accepted API keys, one per line (or env TIDESERVE_API_KEY)")
    parser.add_argument("--admin-token-file", help="file with the admin bearer token, read again when it changes "
                        "(or env TIDESERVE_ADMIN_TOKEN)")
    parser.add_argument("--peak-bandwidth-gbps", type=float,
                        help="the device's memory bandwidth, GB/s, for tideserve_mbu (default: measured at start)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak TFLOP/s in the model's dtype, for tideserve_mfu (default: measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="info")


def engine_config_from_args(args: argparse.Namespace):
    from tideserve.worker.config import EngineConfig

    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        quantization=args.quantization,
        dense_prefill=args.dense_prefill,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        enable_prefix_caching=not args.no_prefix_caching,
        batching_mode=args.batching_mode,
        batch_timeout_s=args.batch_timeout,
        max_waiting_requests=args.max_waiting_requests,
        peak_bandwidth_gbps=args.peak_bandwidth_gbps,
        peak_tflops=args.peak_tflops,
        seed=args.seed,
    )


def read_secrets(env_var: str, path: str | None) -> list[str]:
    values = [v for v in os.environ.get(env_var, "").split(",") if v.strip()]
    if path:
        values += [line for line in Path(path).read_text().splitlines() if line.strip()]
    return [v.strip() for v in values]


def admin_credentials(args: argparse.Namespace):
    """(token from the environment, SecretFile) for the admin port. Fail closed: an empty token file is an
    error, and the port binds beyond loopback only behind a token."""
    from tideserve.secret_file import SecretFile

    token_file = SecretFile(args.admin_token_file) if args.admin_token_file else None
    token = (read_secrets("TIDESERVE_ADMIN_TOKEN", None) or [None])[0]
    if token_file is None and token is None and not _is_loopback(args.admin_host):
        raise ValueError(f"--admin-host {args.admin_host} is reachable from other hosts: set --admin-token-file "
                         "(or TIDESERVE_ADMIN_TOKEN), or keep the admin port on 127.0.0.1")
    return token, token_file


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond this machine


class _Server(uvicorn.Server):
    """uvicorn.Server without its own signal handling: the worker decides what SIGTERM means."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(async_engine, state, host, port, admin_host, admin_port, drain_timeout, log_level="info") -> None:
    """Run both servers and the engine's steps until a drain completes. Also used by tests."""
    from tideserve.worker.api import create_admin_app, create_app

    engine = async_engine.engine
    async_engine.start()
    public = _Server(uvicorn.Config(create_app(async_engine, state), host=host, port=port, log_level=log_level,
                                    timeout_graceful_shutdown=5, access_log=False))
    admin = _Server(uvicorn.Config(create_admin_app(async_engine, state), host=admin_host, port=admin_port,
                                   log_level=log_level, access_log=False))
    drain_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not in the main thread (tests)
            loop.add_signal_handler(sig, drain_requested.set)

    async def drain() -> None:
        await drain_requested.wait()
        state.draining = True
        engine.metrics.draining.set(1)
        deadline = time.monotonic() + drain_timeout
        log.info("draining: %d requests in flight, up to %.0f s", async_engine.num_in_flight, drain_timeout)
        while async_engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if async_engine.num_in_flight:
            log.warning("drain deadline: aborting %d requests", async_engine.num_in_flight)
            async_engine.abort_all()
            await asyncio.sleep(0.2)
        public.should_exit = admin.should_exit = True

    state.request_drain = drain_requested.set
    try:
        await asyncio.gather(public.serve(), admin.serve(), drain())
    finally:
        async_engine.stop()


def _exit_before_serving(signum, frame) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    # A SIGTERM while the model loads (a scale-down or rollout that picks a replica still starting) finds nothing in
    # flight: stop cleanly with exit code 0, as a drain would, instead of dying of the signal. serve() takes over
    # SIGTERM once the servers run.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_serving)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        admin_token, admin_token_file = admin_credentials(args)
    except ValueError as exc:
        print(f"tideserve serve: {exc}", file=sys.stderr)
        return 2
    log.info("loading %s", args.model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the worker loads local directories only
    from tideserve.worker.api import ServerState
    from tideserve.worker.async_engine import AsyncEngine
    from tideserve.worker.engine import LLMEngine

    from tideserve.worker.quantization import QuantizationRefused

    config = engine_config_from_args(args)
    try:
        async_engine = AsyncEngine(lambda: LLMEngine(config))
    except QuantizationRefused as exc:  # never served: the pod fails to start and says why
        print(f"tideserve serve: {exc}", file=sys.stderr)
        return 3
    state = ServerState(
        api_keys=frozenset(read_secrets("TIDESERVE_API_KEY", args.api_key_file)),
        admin_token=admin_token,
        admin_token_file=admin_token_file,
        max_body_bytes=args.max_body_bytes,
    )
    engine = async_engine.engine
    log.info("serving %s on %s:%d (admin %s:%d)", engine.model_name, args.host, args.port, args.admin_host,
             args.admin_port)
    try:
        asyncio.run(serve(async_engine, state, args.host, args.port, args.admin_host, args.admin_port, args.drain_timeout,
                          args.log_level))
    finally:
        engine.close()
    log.info("drained, exiting")
    return 0
