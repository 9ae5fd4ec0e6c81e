"""`tideserve bench`: load-test any OpenAI-compatible endpoint, in the spirit of `vllm bench serve`.

Requests arrive on a Poisson schedule (`--request-rate`) or replay a trace's arrival times (`--trace`), each with a
synthetic prompt of the wanted length and `max_tokens` set to the wanted completion length. Every request streams,
so the client measures TTFT, TPOT, inter-token latency and end-to-end latency itself, whatever serves the endpoint.

From Python, build a workload with tideserve.traces and `await run_benchmark(BenchConfig(...))`.
Only light imports here: the CLI imports this module to declare its arguments, and it must never pull in torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

from tideserve.traces import TraceRequest, load_trace, poisson_arrivals, sample_lengths, scale_time, scale_tokens

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DEFAULT_NUM_REQUESTS = 100

# Common English words that each encode to a single token (with their leading space) in the usual BPE vocabularies
# (GPT-2, Llama, Mistral, Qwen, SmolLM), so an N-word prompt is about N tokens without the server's tokenizer.
# Words are drawn at random per request so a prefix cache cannot turn the load into cache hits.
PROMPT_WORDS = (
    "the of and to in is that for it was on with as be at by this have from or one had not but what all were when "
    "we there can an your which their said if do will each about how up out them then she many some so these would "
    "other into has more her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know"
).split()


class BenchError(RuntimeError):
    """A benchmark that cannot start, e.g. the server is unreachable; reported without a traceback."""


@dataclass
class BenchConfig:
    """One benchmark run: a workload and where to send it."""

    base_url: str
    workload: list[TraceRequest]
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model that GET /v1/models lists
    api_key: str | None = None
    max_concurrency: int | None = None  # requests beyond it wait for a slot (after their arrival time)
    timeout_s: float = 600.0  # per request, from send to the end of its stream
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0  # for the prompt words
    label: str = ""
    progress: bool = False


@dataclass
class RequestRecord:
    index: int
    scheduled_s: float  # arrival time from the workload, relative to the start of the run
    input_tokens: int  # requested prompt length
    max_tokens: int  # requested completion length
    sent_s: float | None = None  # when it was sent; later than scheduled_s while waiting for a concurrency slot
    prompt_tokens: int | None = None  # the server's count, from the usage chunk
    output_tokens: int = 0  # the server's count from the usage chunk, else the number of content chunks
    success: bool = False
    status: int | None = None  # HTTP status, None if no response arrived
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; undefined for single-token completions."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "tpot_s": self.tpot_s}


@dataclass
class LatencyStats:
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        if not seconds:
            return cls(None, None, None, None)
        ms = np.asarray(seconds) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99))


@dataclass
class BenchSummary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests/s
    input_throughput: float  # prompt tokens/s of completed requests
    output_throughput: float  # output tokens/s of completed requests
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    # Completed requests that met every SLO given (None without SLOs), per second and in output tokens per second.
    goodput: float | None
    goodput_output_throughput: float | None
    errors: dict[str, int]  # failure message -> count
    # What the server says of its steps over the run (tideserve workers: tideserve_mbu / tideserve_mfu), the mean
    # over decode steps and over prefill steps; None where the server does not export them.
    server_mbu_decode: float | None = None
    server_mfu_prefill: float | None = None


@dataclass
class BenchResult:
    label: str
    model: str
    endpoint: str
    summary: BenchSummary
    records: list[RequestRecord]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "model": self.model,
            "endpoint": self.endpoint,
            "summary": asdict(self.summary),
            "requests": [r.to_dict() for r in self.records],
        }


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Send the workload at its arrival times and measure every request; failed requests are recorded, not raised."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # httpx caps a client at 100 connections by default, which would silently cap concurrency; --max-concurrency
    # is the knob for that. Timeouts are enforced per request by run_one instead of per socket operation.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=_api_root(config.base_url), headers=headers, limits=limits, timeout=None
    ) as client:
        model = config.model or await first_model(client)
        slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
        progress = tqdm(
            total=len(config.workload), desc=config.label or "requests", unit="req", disable=not config.progress
        )
        before = await server_step_utilization(client)
        start = time.perf_counter()

        async def run_one(index: int, request: TraceRequest) -> RequestRecord:
            record = RequestRecord(index, request.arrival_s, request.input_tokens, request.output_tokens)
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
            async with slots:
                # Prompts are built at send time so a long trace never holds all of them in memory.
                prompt = (list(request.prompt_token_ids) if request.prompt_token_ids is not None
                          else make_prompt(request.input_tokens, random.Random(f"{config.seed}-{index}")))
                payload = build_payload(config.endpoint, model, prompt, request.output_tokens)
                record.sent_s = time.perf_counter() - start
                try:
                    await asyncio.wait_for(send_request(client, config.endpoint, payload, record), config.timeout_s)
                except asyncio.TimeoutError:
                    record.error = f"timed out after {config.timeout_s:g} s"
            progress.update()
            return record

        records = await asyncio.gather(*(run_one(i, r) for i, r in enumerate(config.workload)))
        duration_s = time.perf_counter() - start
        progress.close()
        after = await server_step_utilization(client)
    summary = summarize(records, duration_s, config.slo_ttft_ms, config.slo_tpot_ms)
    summary.server_mbu_decode = _mean_between(before, after, ("tideserve_mbu", "decode"))
    summary.server_mfu_prefill = _mean_between(before, after, ("tideserve_mfu", "prefill"))
    return BenchResult(config.label, model, config.endpoint, summary, records)


async def server_step_utilization(client: httpx.AsyncClient) -> dict[tuple[str, str], tuple[float, float]]:
    """(metric, step kind) -> (sum, count) of the server's per-step MBU/MFU histograms on GET /metrics; empty
    where it exports none or has no /metrics (behind a proxy: the worker that answered)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = await client.get("/metrics", timeout=10.0)
        if response.status_code != 200:
            return {}
        found: dict[tuple[str, str], list[float]] = {}
        for family in text_string_to_metric_families(response.text):
            if family.name not in ("tideserve_mbu", "tideserve_mfu"):
                continue
            for sample in family.samples:
                suffix = sample.name[len(family.name):]
                if suffix in ("_sum", "_count") and "kind" in sample.labels:
                    pair = found.setdefault((family.name, sample.labels["kind"]), [0.0, 0.0])
                    pair[suffix == "_count"] += sample.value
        return {key: (s, c) for key, (s, c) in found.items()}
    except (httpx.HTTPError, ValueError):
        return {}


def _mean_between(before: dict, after: dict, key: tuple[str, str]) -> float | None:
    if key not in after:
        return None
    total, count = (a - b for a, b in zip(after[key], before.get(key, (0.0, 0.0))))
    return total / count if count > 0 else None


def _api_root(base_url: str) -> str:
    """The server root: OpenAI clients are usually given `.../v1`, and the endpoints already start with /v1."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def first_model(client: httpx.AsyncClient) -> str:
    request = client.build_request("GET", "/v1/models")
    try:
        response = await client.send(request)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except httpx.HTTPError as e:
        raise BenchError(f"cannot list models at {request.url} ({type(e).__name__}: {e}); is the server up?") from e
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{request.url} listed no model; pass --model") from e


def make_prompt(num_tokens: int, rng: random.Random) -> str:
    """About num_tokens tokens of random common words."""
    return " ".join(rng.choices(PROMPT_WORDS, k=num_tokens))


def build_payload(endpoint: str, model: str, prompt: str | list[int], max_tokens: int) -> dict:
    payload = {
        "model": model,
        "max_tokens": max_tokens,
        # Generate exactly max_tokens so output lengths follow the workload, not the model's whims.
        "ignore_eos": True,
        "stream": True,
        # Ask for a final usage chunk: the server's own token counts beat counting chunks.
        "stream_options": {"include_usage": True},
    }
    if endpoint == "/v1/chat/completions":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


async def send_request(client: httpx.AsyncClient, endpoint: str, payload: dict, record: RequestRecord) -> None:
    """Stream one request, filling in the record's status, timings and token counts as they arrive."""
    sent = last = time.perf_counter()
    content_chunks = 0
    try:
        async with client.stream("POST", endpoint, json=payload) as response:
            record.status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace").strip()
                record.error = f"HTTP {response.status_code}: {body[:300]}"
                return
            async for data in _sse_data(response):
                if data == "[DONE]":
                    record.e2e_s = time.perf_counter() - sent
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # vLLM reports errors that happen mid-stream as a chunk
                    record.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    record.output_tokens = chunk["usage"].get("completion_tokens") or 0
                if _has_content(chunk):
                    now = time.perf_counter()
                    if record.ttft_s is None:
                        record.ttft_s = now - sent
                    else:
                        record.itl_s.append(now - last)
                    last = now
                    content_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return
    if record.e2e_s is None:
        record.error = "stream ended without [DONE]"
    elif content_chunks == 0:
        record.error = "no content in the stream"
    else:
        # Without a usage chunk, count chunks: servers normally send one token per chunk.
        record.output_tokens = record.output_tokens or content_chunks
        record.success = True


async def _sse_data(response: httpx.Response):
    """The payloads of the `data:` lines of a server-sent event stream."""
    async for line in response.aiter_lines():
        # Blank lines separate events; comments (": ping") and other fields carry nothing to measure.
        if line.startswith("data:"):
            yield line[len("data:") :].strip()


def _has_content(chunk: dict) -> bool:
    """Whether a stream chunk carries generated text (not just a role, a finish reason or usage)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        # Completions stream `text`; chat streams `delta.content`, or `delta.reasoning_content` while a model reasons.
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> BenchSummary:
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens or r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    if slo_ttft_ms is None and slo_tpot_ms is None:
        goodput = goodput_output = None
    else:
        good = [r for r in done if meets_slo(r, slo_ttft_ms, slo_tpot_ms)]
        goodput = len(good) / duration_s
        goodput_output = sum(r.output_tokens for r in good) / duration_s
    return BenchSummary(
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        input_throughput=input_tokens / duration_s,
        output_throughput=output_tokens / duration_s,
        ttft=LatencyStats.of([r.ttft_s for r in done]),
        tpot=LatencyStats.of([r.tpot_s for r in done if r.tpot_s is not None]),
        itl=LatencyStats.of([itl for r in done for itl in r.itl_s]),
        e2e=LatencyStats.of([r.e2e_s for r in done]),
        goodput=goodput,
        goodput_output_throughput=goodput_output,
        errors=dict(Counter(r.error for r in records if not r.success).most_common()),
    )


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a completed request met the SLOs given; a single-token completion has no TPOT to miss."""
    if slo_ttft_ms is not None and record.ttft_s * 1000.0 > slo_ttft_ms:
        return False
    tpot = record.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000.0 <= slo_tpot_ms


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def format_summary(result: BenchResult) -> str:
    s = result.summary
    lines = [
        f"{' ' + (result.label or 'benchmark') + ' ':=^64}",
        _row("Model", result.model),
        _row("Endpoint", result.endpoint),
        _row("Successful requests", s.completed),
        _row("Failed requests", s.failed),
        _row("Duration (s)", f"{s.duration_s:.2f}"),
        _row("Request throughput (req/s)", f"{s.request_throughput:.2f}"),
        _row("Input token throughput (tok/s)", f"{s.input_throughput:.1f}"),
        _row("Output token throughput (tok/s)", f"{s.output_throughput:.1f}"),
    ]
    if s.goodput is not None:
        lines += [
            _row("Goodput (req/s)", f"{s.goodput:.2f}"),
            _row("Goodput output (tok/s)", f"{s.goodput_output_throughput:.1f}"),
        ]
    for label, value in (("Server MBU, decode steps (mean)", s.server_mbu_decode),
                         ("Server MFU, prefill steps (mean)", s.server_mfu_prefill)):
        if value is not None:
            lines.append(_row(label, f"{100 * value:.1f}%"))
    lines.append(f"{'Latency (ms)':<32}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}")
    for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
        values = (stats.mean_ms, stats.p50_ms, stats.p90_ms, stats.p99_ms)
        lines.append(f"  {name:<30}" + "".join(f"{_ms(v):>8}" for v in values))
    for error, count in s.errors.items():
        lines.append(f"  {count} x {error}")
    lines.append("=" * 64)
    return "\n".join(lines)


def format_sweep(results: list[BenchResult]) -> str:
    header = f"{'run':<16}{'ok':>6}{'failed':>8}{'req/s':>8}{'out tok/s':>11}"
    header += "".join(f"{name:>10}" for name in ("TTFT p90", "TTFT p99", "TPOT p90", "TPOT p99"))
    lines = [header]
    for r in results:
        s = r.summary
        latencies = (s.ttft.p90_ms, s.ttft.p99_ms, s.tpot.p90_ms, s.tpot.p99_ms)
        lines.append(
            f"{r.label:<16}{s.completed:>6}{s.failed:>8}{s.request_throughput:>8.2f}{s.output_throughput:>11.1f}"
            + "".join(f"{_ms(v):>10}" for v in latencies)
        )
    return "\n".join(lines)


def _row(name: str, value) -> str:
    return f"{name + ':':<40}{value}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_sweep(results: list[BenchResult], path: str) -> None:
    """Throughput against latency for a rate sweep: output tok/s vs TTFT and TPOT (p90 and p99), one point per rate."""
    # A bare Figure renders with the Agg canvas and leaves pyplot's global backend state alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    throughput = [r.summary.output_throughput for r in results]
    for axes, metric in zip(figure.subplots(1, 2), ("ttft", "tpot")):
        for percentile in ("p90", "p99"):
            latency = [_nan_if_none(getattr(getattr(r.summary, metric), f"{percentile}_ms")) for r in results]
            axes.plot(throughput, latency, marker="o", label=f"{metric.upper()} {percentile}")
        # Label the p99 points (the last line drawn) with their run, e.g. the rate.
        for r, x, y in zip(results, throughput, latency):
            axes.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel("output throughput (tok/s)")
        axes.set_ylabel(f"{metric.upper()} (ms)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{results[0].model} via {results[0].endpoint}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def write_json(path: str, args: argparse.Namespace, results: list[BenchResult]) -> None:
    """One run: its summary and requests at the top level; a sweep: a list of runs."""
    settings = {k: _json_number(v) for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"}
    if len(results) == 1:
        document = {"args": settings, **results[0].to_dict()}
    else:
        document = {"args": settings, "runs": [r.to_dict() for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)


def _json_number(value):
    """Infinite rates as the string "inf": JSON has no infinity."""
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return "inf" if isinstance(value, float) and math.isinf(value) else value


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_workload(
    args: argparse.Namespace, trace: list[TraceRequest] | None, rate: float | None
) -> list[TraceRequest]:
    """Arrival times and lengths for one run.

    rate None replays the trace; otherwise arrivals are Poisson at `rate`, with lengths drawn from the trace,
    or the fixed --input-len/--output-len without one.
    """
    if rate is None:
        workload = scale_time(trace[: args.num_requests], args.time_scale)
    else:
        n = args.num_requests or DEFAULT_NUM_REQUESTS
        # The same seed for every rate of a sweep, so the rates differ in arrivals only.
        lengths = sample_lengths(trace, n, args.seed) if trace else [(args.input_len, args.output_len)] * n
        arrivals = poisson_arrivals(n, rate, args.seed, args.burstiness)
        workload = [TraceRequest(t, i, o) for t, (i, o) in zip(arrivals, lengths)]
    return scale_tokens(
        workload, args.input_scale, args.output_scale, args.max_input_tokens, args.max_output_tokens, args.max_model_len
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root; a trailing /v1 is fine (default: %(default)s)"
    )
    target.add_argument("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS, help="(default: %(default)s)")
    target.add_argument("--model", help="model name to request (default: the first id from GET /v1/models)")
    # Read from the environment in run(), not as the default: argparse would print the key in --help.
    target.add_argument("--api-key", metavar="KEY", help="bearer token (default: $OPENAI_API_KEY)")
    target.add_argument(
        "--timeout", type=_positive_float, default=600.0, metavar="S", help="per-request timeout (default: %(default)s)"
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--num-requests", type=_positive_int, metavar="N",
        help=f"requests per run (default: {DEFAULT_NUM_REQUESTS} with Poisson arrivals, the whole trace on replay)",
    )
    rates = load.add_mutually_exclusive_group()
    rates.add_argument(
        "--request-rate", type=_rate, metavar="REQ_PER_S",
        help="Poisson arrivals at this many req/s ('inf': all at once); default: replay --trace, else inf",
    )
    rates.add_argument(
        "--sweep-rates", type=_rate_list, metavar="R1,R2,...",
        help="run the workload once per Poisson rate (req/s) and report each",
    )
    load.add_argument(
        "--trace", metavar="FILE|azure-conv|azure-code",
        help="trace CSV (canonical arrival_s,input_tokens,output_tokens or Azure 2023): replayed as is, "
        "or only its lengths sampled when a rate is given",
    )
    load.add_argument(
        "--time-scale", type=_positive_float, default=1.0, metavar="X",
        help="trace replay speed-up: 2 = twice as fast (default: 1)",
    )
    load.add_argument(
        "--burstiness", type=_positive_float, default=1.0, metavar="SHAPE",
        help="gamma shape of the inter-arrival times: 1 = Poisson, <1 burstier, >1 more regular (default: 1)",
    )
    load.add_argument(
        "--max-concurrency", type=_positive_int, metavar="N", help="most requests in flight at once (default: no limit)"
    )
    load.add_argument("--seed", type=int, default=0, help="seed for arrivals, sampled lengths and prompts (default: 0)")

    lengths = parser.add_argument_group("lengths (tokens)")
    lengths.add_argument(
        "--input-len", type=_positive_int, default=256, help="prompt length without --trace (default: %(default)s)"
    )
    lengths.add_argument(
        "--output-len", type=_positive_int, default=128, help="completion length without --trace (default: %(default)s)"
    )
    lengths.add_argument(
        "--input-scale", type=_positive_float, default=1.0, help="multiply prompt lengths (default: 1)"
    )
    lengths.add_argument(
        "--output-scale", type=_positive_float, default=1.0, help="multiply completion lengths (default: 1)"
    )
    lengths.add_argument("--max-input-tokens", type=_positive_int, help="clamp prompt lengths")
    lengths.add_argument("--max-output-tokens", type=_positive_int, help="clamp completion lengths")
    lengths.add_argument(
        "--max-model-len", type=_positive_int,
        help="clamp prompt + completion, shortening the prompt first; leave a margin: prompt lengths are approximate",
    )

    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft-ms", type=_positive_float, help="TTFT objective for goodput")
    report.add_argument("--slo-tpot-ms", type=_positive_float, help="TPOT objective for goodput")
    report.add_argument("--json", metavar="OUT.json", help="write the summary and per-request records")
    report.add_argument("--plot", metavar="OUT.png", help="with --sweep-rates: plot throughput against latency")
    report.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a tty)")


def run(args: argparse.Namespace) -> int:
    if args.plot and not args.sweep_rates:
        return _fail("--plot needs --sweep-rates")
    try:
        trace = load_trace(args.trace) if args.trace else None
    except (OSError, ValueError) as e:
        return _fail(e)
    if args.sweep_rates:
        rates = args.sweep_rates
    elif args.request_rate is not None:
        rates = [args.request_rate]
    else:
        rates = [None if trace else math.inf]  # None: replay the trace's own arrivals

    results = []
    for rate in rates:
        config = BenchConfig(
            base_url=args.base_url,
            workload=build_workload(args, trace, rate),
            endpoint=args.endpoint,
            model=args.model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            max_concurrency=args.max_concurrency,
            timeout_s=args.timeout,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            seed=args.seed,
            label=f"replay x{args.time_scale:g}" if rate is None else f"{rate:g} req/s",
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        try:
            result = asyncio.run(run_benchmark(config))
        except BenchError as e:
            return _fail(e)
        print(format_summary(result))
        results.append(result)

    if len(results) > 1:
        print(format_sweep(results))
    if args.json:
        write_json(args.json, args, results)
    if args.plot:
        plot_sweep(results, args.plot)
    return 0 if any(r.summary.completed for r in results) else 1


def _fail(message) -> int:
    print(f"tideserve bench: error: {message}", file=sys.stderr)
    return 2


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _rate(text: str) -> float:
    """A request rate in req/s; float() reads "inf", which sends every request at once."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive or inf, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _rate_list(text: str) -> list[float]:
    rates = [_rate(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise argparse.ArgumentTypeError("needs at least one rate")
    return rates
