"""`tideserve bench-engine`: engine configurations side by side (weights int8/int4/fp8, int4 with its
dense-prefill copy, the FP8 KV cache, tensor parallelism over 2 ranks) against the unquantized single-rank
engine, in one run: the seeds' three benchmarks (TTFT/TPOT at batch 1; maximum throughput against the batch size
with static batches; the throughput-latency curve over request rates), each as a table and, with --png, a chart,
and the quality of each configuration.

Speed: one request at a time through the engine's own step loop (no HTTP): a fixed prompt of `prompt_tokens`
random tokens (512: the seeds' benchmark) and `output_tokens` greedy tokens, EOS ignored. TTFT from submit to
the first token, TPOT between the first and the last; the best of `rounds` replays, the configurations
alternating so that a busy machine slows all alike. Each configuration runs on the machine's threads (a
tensor-parallel one: its share per rank). MBU per decode step from the engine's own histogram
(worker/utilization.py: bytes at the stored dtypes).

Throughput against batch size: B requests (the same prompt length, `output_tokens` each) submitted together and
run to completion with nothing else arriving, a static batch; output tokens over the batch's wall time.
Throughput-latency: `rate_requests` requests at each Poisson rate (seed 0, the same arrivals for every
configuration), submitted at their arrival times while the engine steps; achieved output tokens/s against TTFT
and TPOT percentiles.

Quality, on SmolLM2's real weights: 16 fixed prompts, each continued greedily for 64 tokens by the unquantized
engine; each configuration then scores prompt + continuation through the server's own path (quantized weights,
the paged KV cache at its dtype, the sharded model, 16-token chunks) and the share of those 64 positions whose
greedy token is the reference's is its agreement (teacher forcing: one early difference does not make every
later token differ); max/mean logit error over those positions; perplexity on the public-domain text of
tideserve/data/text. Configurations that the engine's own quality gate refuses are reported as refused, with
the gate's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

CONFIGS = {  # name: (quantization, kv_cache_dtype, tensor_parallel_size, dense_prefill)
    "fp32": ("none", "auto", 1, False),
    "int8": ("int8", "auto", 1, False),
    "int4": ("int4", "auto", 1, False),
    "int4+dense-prefill": ("int4", "auto", 1, True),
    "fp8": ("fp8", "auto", 1, False),
    "fp32+kv-fp8": ("none", "fp8", 1, False),
    "int8+kv-fp8": ("int8", "fp8", 1, False),
    "fp32-tp2": ("none", "auto", 2, False),
}
PROMPTS = (
    "The history of the Roman empire begins", "To bake bread at home you need", "The three laws of motion state",
    "A good way to learn a new language is", "The capital of Australia is", "def fibonacci(n):",
    "Photosynthesis is the process by which", "Once upon a time, in a small village,",
    "The main causes of the First World War were", "To install Python packages, run",
    "The difference between a virus and a bacterium is", "In the year 1969, astronauts",
    "My favourite recipe for soup uses", "The stock market fell today because",
    "Dear hiring manager, I am writing to", "The tallest mountain in Europe is",
)


@dataclass
class ConfigResult:
    config: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    decode_tok_s: float | None = None
    mbu: float | None = None
    kv_tokens_per_gib: float | None = None
    agreement: float | None = None
    max_logit_error: float | None = None
    mean_logit_error: float | None = None
    perplexity: float | None = None
    refused: str | None = None
    batch_sweep: list[dict] = field(default_factory=list)  # one row per batch size (_serve)
    rate_sweep: list[dict] = field(default_factory=list)  # one row per request rate (_serve)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="the unquantized dtype (float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--batch-sizes", default="1,4,16",
                        help="static batch sizes for the throughput sweep (comma-separated; empty: skip it)")
    parser.add_argument("--rates", default="0.25,0.5,1",
                        help="request rates (req/s) for the throughput-latency curve (comma-separated; empty: skip it)")
    parser.add_argument("--rate-requests", type=int, default=16, help="requests per rate")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="write the charts as PREFIX-batch1.png, PREFIX-batch-sweep.png, PREFIX-rates.png")


def _engine(args, name: str):
    from tideserve.worker.config import EngineConfig
    from tideserve.worker.engine import LLMEngine

    quantization, kv, tp, dense_prefill = CONFIGS[name]
    torch.set_num_threads(args.threads)  # a tensor-parallel engine takes its share per rank from here
    return LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=quantization,
                                  dense_prefill=dense_prefill, kv_cache_dtype=kv, tensor_parallel_size=tp,
                                  max_model_len=1024, kv_cache_memory_gb=0.5, enable_prefix_caching=False))


def _greedy(engine, prompt: list[int], tokens: int) -> tuple[list[int], float, float]:
    """(tokens, TTFT s, seconds from the first token to the last)."""
    from tideserve.worker.sequence import SamplingParams

    submitted = time.perf_counter()
    engine.submit(f"bench-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                         ignore_eos=True))
    out: list[int] = []
    first = last = None
    while engine.has_work():
        for o in engine.step():
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            out += o.token_ids
    return out, first - submitted, last - first


def _serve(engine, prompt: list[int], arrivals: list[float], output_tokens: int) -> dict:
    """Requests of `prompt` submitted at their arrival offsets (seconds from now) while the engine steps; one row of
    achieved output tokens/s and TTFT/TPOT percentiles."""
    from tideserve.worker.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    pending = sorted(arrivals)
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0] <= now:
            request_id = f"load-{len(submitted)}"
            submitted[request_id] = pending.pop(0)
            engine.submit(request_id, prompt, params)
        if not engine.has_work():
            time.sleep(min(0.05, pending[0] - now))
            continue
        for o in engine.step():
            now = time.perf_counter() - start
            first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = now
    ttft = np.array([first[r] - submitted[r] for r in submitted])
    tpot = np.array([(done[r] - first[r]) / (output_tokens - 1) for r in submitted]) if output_tokens > 1 else ttft * 0
    seconds = max(done.values()) - min(submitted.values())
    return {"requests": len(submitted), "seconds": seconds, "output_tok_s": len(submitted) * output_tokens / seconds,
            **{f"ttft_p{q}_ms": float(np.percentile(ttft, q)) * 1e3 for q in (50, 90)},
            **{f"tpot_p{q}_ms": float(np.percentile(tpot, q)) * 1e3 for q in (50, 90)}}


def _sweeps(args, engines: dict, results: dict, prompt: list[int]) -> None:
    """The batch-size and rate sweeps, configurations alternating at each point."""
    from tideserve.traces import poisson_arrivals

    points = [("batch_sweep", {"batch": batch}, [0.0] * batch) for batch in _numbers(args.batch_sizes, int)]
    points += [("rate_sweep", {"rate": rate}, poisson_arrivals(args.rate_requests, rate, seed=0))
               for rate in _numbers(args.rates, float)]
    for sweep, point, arrivals in points:
        for name, engine in engines.items():
            _use_threads(args, name)
            row = {**point, **_serve(engine, prompt, arrivals, args.output_tokens)}
            getattr(results[name], sweep).append(row)
            print(f"{point} {name}: {row['output_tok_s']:.1f} output tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                  f"TPOT p50 {row['tpot_p50_ms']:.0f} ms", flush=True)


def _use_threads(args, name: str) -> None:
    """The machine's threads for a configuration: a tensor-parallel one's share per rank."""
    torch.set_num_threads(max(1, args.threads // CONFIGS[name][2]))


def _numbers(text: str, kind) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def _decode_mbu_totals(engine) -> tuple[float, float]:
    """(sum, count) of the engine's own tideserve_mbu histogram for decode steps."""
    labels = {"model_name": engine.model_name, "kind": "decode"}
    return tuple(engine.metrics.registry.get_sample_value(f"tideserve_mbu_{part}", labels) or 0.0
                 for part in ("sum", "count"))


@dataclass
class Reference:
    prompts: list[list[int]]
    logits: torch.Tensor  # [16 x 64, vocab]: the unquantized next-token logits at every continuation position
    continuations: list[list[int]]
    text_ids: list[int]
    text_perplexity: float


def _continuation_logits(engine, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """Next-token logits at each continuation position, scored through the server's path (teacher forcing)."""
    rows = []
    for prompt, continuation in zip(prompts, continuations):
        ids = prompt + continuation
        rows.append(engine.runner.score(ids)[len(prompt) - 1: len(ids) - 1])
    return torch.cat(rows)


def _perplexity(engine, text_ids: list[int]) -> float:
    logits = engine.runner.score(text_ids)
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(text_ids[1:])).item())


def reference(engine) -> Reference:
    from tideserve.worker import quantization

    prompts = [engine.tokenizer(text)["input_ids"] for text in PROMPTS]
    continuations = [_greedy(engine, prompt, 64)[0] for prompt in prompts]
    text_ids = engine.tokenizer(quantization.gate_text())["input_ids"][: quantization.GATE_TOKENS]
    return Reference(prompts, _continuation_logits(engine, prompts, continuations), continuations, text_ids,
                     _perplexity(engine, text_ids))


def quality(engine, ref: Reference) -> dict:
    logits = _continuation_logits(engine, ref.prompts, ref.continuations)
    error = (logits - ref.logits).abs()
    return {"agreement": (logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item(),
            "max_logit_error": error.max().item(), "mean_logit_error": error.mean().item(),
            "perplexity": _perplexity(engine, ref.text_ids)}


def run(args: argparse.Namespace) -> int:
    from tideserve.worker.quantization import QuantizationRefused

    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.configs.split(",") if m.strip()]
    if names[:1] != ["fp32"] or any(m not in CONFIGS for m in names):
        print(f"bench-engine: --configs must start with fp32 (the baseline) and name only {', '.join(CONFIGS)}; "
              f"got {args.configs!r}", file=sys.stderr)
        return 2
    engines, results = {}, {}
    ref = prompt = None
    for name in names:  # load every configuration first (each behind the engine's own gate), score it, warm it up
        try:
            engine = _engine(args, name)
        except QuantizationRefused as exc:
            results[name] = ConfigResult(name, refused=str(exc))
            print(f"{name}: refused by the quality gate: {exc}", flush=True)
            continue
        if ref is None:  # fp32 comes first
            ref = reference(engine)
            vocab, rng = len(engine.tokenizer), random.Random(0)
            prompt = [rng.randrange(min(1000, vocab // 2), min(40000, vocab)) for _ in range(args.prompt_tokens)]
        results[name] = ConfigResult(name, kv_tokens_per_gib=engine.runner.num_blocks * engine.config.block_size
                                   / engine.config.kv_cache_memory_gb, **quality(engine, ref))
        _greedy(engine, prompt, 8)
        engines[name] = engine
        print(f"{name}: loaded, agreement {results[name].agreement:.1%}", flush=True)
    best: dict[str, tuple[float, float]] = {}  # (TTFT, TPOT) seconds, each the best of the rounds
    mbu_before = {name: _decode_mbu_totals(engine) for name, engine in engines.items()}
    for round_ in range(args.rounds):
        for name in engines if round_ % 2 == 0 else reversed(list(engines)):
            _use_threads(args, name)
            tokens, ttft, decode_s = _greedy(engines[name], prompt, args.output_tokens)
            tpot = decode_s / (len(tokens) - 1)
            previous = best.get(name, (ttft, tpot))
            best[name] = (min(previous[0], ttft), min(previous[1], tpot))
            print(f"round {round_ + 1} {name}: TTFT {ttft * 1e3:.0f} ms, {1 / tpot:.1f} tok/s", flush=True)
    for name, engine in engines.items():
        ttft, tpot = best[name]
        results[name].ttft_ms, results[name].tpot_ms, results[name].decode_tok_s = ttft * 1e3, tpot * 1e3, 1 / tpot
        (sum_after, count_after), (sum_before, count_before) = _decode_mbu_totals(engine), mbu_before[name]
        results[name].mbu = (sum_after - sum_before) / (count_after - count_before) if count_after > count_before else None
    _sweeps(args, engines, results, prompt)
    for engine in engines.values():
        engine.close()
    base = results["fp32"]
    print(f"\nbatch 1, {args.prompt_tokens}-token prompt, {args.output_tokens} tokens, best of {args.rounds}; "
          f"quality: 16 prompts x 64 tokens, perplexity on the Gettysburg Address "
          f"(fp32 {ref.text_perplexity:.2f})" if ref else "")
    print(f"{'config':<20}{'TTFT ms':>9}{'TPOT ms':>9}{'tok/s':>8}{'x fp32':>8}{'MBU':>7}{'KV tok/GiB':>12}"
          f"{'agree':>8}{'max err':>9}{'mean err':>9}{'ppl':>8}")
    for r in results.values():
        if r.refused:
            print(f"{r.config:<20}  refused by the quality gate")
            continue
        ratio = r.decode_tok_s / base.decode_tok_s if base.decode_tok_s else math.nan
        print(f"{r.config:<20}{r.ttft_ms:>9.0f}{r.tpot_ms:>9.1f}{r.decode_tok_s:>8.1f}{ratio:>8.2f}{(r.mbu or 0):>7.3f}"
              f"{r.kv_tokens_per_gib:>12.0f}{r.agreement:>8.1%}{r.max_logit_error:>9.3f}{r.mean_logit_error:>9.4f}"
              f"{r.perplexity:>8.2f}")
    _print_sweeps(results.values(), args)
    if args.png:
        _plot(list(results.values()), args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "reference_perplexity": ref.text_perplexity if ref else None,
                       "configs": [asdict(r) for r in results.values()]}, f, indent=2)
    return 0


def _print_sweeps(results, args) -> None:
    served = [r for r in results if not r.refused]
    if any(r.batch_sweep for r in served):
        print(f"\nstatic batches: {args.prompt_tokens} in, {args.output_tokens} out; output tok/s (TPOT p50 ms)")
        print(f"{'batch':<7}" + "".join(f"{r.config:>21}" for r in served))
        for i, row in enumerate(served[0].batch_sweep):
            print(f"{row['batch']:<7}" + "".join(
                f"{r.batch_sweep[i]['output_tok_s']:>14.1f} ({r.batch_sweep[i]['tpot_p50_ms']:>4.0f})" for r in served))
    if any(r.rate_sweep for r in served):
        print(f"\nPoisson rates, {args.rate_requests} requests each: output tok/s, TTFT p50/p90 ms, TPOT p50/p90 ms")
        print(f"{'config':<20}{'rate':>6}{'tok/s':>8}{'TTFT p50':>10}{'p90':>8}{'TPOT p50':>10}{'p90':>8}")
        for r in served:
            for row in r.rate_sweep:
                print(f"{r.config:<20}{row['rate']:>6.2f}{row['output_tok_s']:>8.1f}{row['ttft_p50_ms']:>10.0f}"
                      f"{row['ttft_p90_ms']:>8.0f}{row['tpot_p50_ms']:>10.0f}{row['tpot_p90_ms']:>8.0f}")


def _plot(results: list[ConfigResult], prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [r for r in results if not r.refused]
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [r.config for r in served]
    ax_ttft.bar(names, [r.ttft_ms for r in served])
    ax_tpot.bar(names, [r.tpot_ms for r in served])
    ax_ttft.set_ylabel("TTFT ms (batch 1)")
    ax_tpot.set_ylabel("TPOT ms (batch 1)")
    for ax in (ax_ttft, ax_tpot):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(f"{prefix}-batch1.png", dpi=100)
    plt.close(fig)
    if any(r.batch_sweep for r in served):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for r in served:
            ax.plot([row["batch"] for row in r.batch_sweep], [row["output_tok_s"] for row in r.batch_sweep], "o-",
                    label=r.config)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("static batch size")
        ax.set_ylabel("output tokens/s")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{prefix}-batch-sweep.png", dpi=100)
        plt.close(fig)
    if any(r.rate_sweep for r in served):
        fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(9, 3.4))
        for r in served:
            tok_s = [row["output_tok_s"] for row in r.rate_sweep]
            ax_ttft.plot(tok_s, [row["ttft_p50_ms"] for row in r.rate_sweep], "o-", label=r.config)
            ax_tpot.plot(tok_s, [row["tpot_p50_ms"] for row in r.rate_sweep], "o-", label=r.config)
        ax_ttft.set_ylabel("TTFT p50 ms")
        ax_tpot.set_ylabel("TPOT p50 ms")
        for ax in (ax_ttft, ax_tpot):
            ax.set_xlabel("achieved output tokens/s")
        ax_tpot.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{prefix}-rates.png", dpi=100)
        plt.close(fig)
