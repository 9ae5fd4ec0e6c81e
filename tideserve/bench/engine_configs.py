"""`tideserve bench-engine`: engine configurations side by side at batch 1 (weights int8/fp8, the FP8 KV cache,
tensor parallelism over 2 ranks) against the unquantized single-rank engine, in one run.

Speed: one request at a time through the engine's own step loop (no HTTP): a fixed prompt of `prompt_tokens`
random tokens (512: the seeds' benchmark) and `output_tokens` greedy tokens, EOS ignored. TTFT from submit to
the first token, TPOT between the first and the last; the best of `rounds` replays, the configurations
alternating so that a busy machine slows all alike. Each configuration runs on the machine's threads (a
tensor-parallel one: its share per rank). MBU per decode step from the engine's own histogram
(worker/utilization.py: bytes at the stored dtypes).

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
from dataclasses import asdict, dataclass

import torch

CONFIGS = {  # name: (quantization, kv_cache_dtype, tensor_parallel_size)
    "fp32": ("none", "auto", 1),
    "int8": ("int8", "auto", 1),
    "fp8": ("fp8", "auto", 1),
    "fp32+kv-fp8": ("none", "fp8", 1),
    "int8+kv-fp8": ("int8", "fp8", 1),
    "fp32-tp2": ("none", "auto", 2),
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="the unquantized dtype (float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--json", help="write the results here")


def _engine(args, name: str):
    from tideserve.worker.config import EngineConfig
    from tideserve.worker.engine import LLMEngine

    quantization, kv, tp = CONFIGS[name]
    torch.set_num_threads(args.threads)  # a tensor-parallel engine takes its share per rank from here
    return LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=quantization,
                                  kv_cache_dtype=kv, tensor_parallel_size=tp, max_model_len=1024,
                                  kv_cache_memory_gb=0.5, enable_prefix_caching=False))


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
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(args.prompt_tokens)]
    engines, results = {}, {}
    ref = None
    for name in names:  # load every configuration first (each behind the engine's own gate), score it, warm it up
        try:
            engine = _engine(args, name)
        except QuantizationRefused as exc:
            results[name] = ConfigResult(name, refused=str(exc))
            print(f"{name}: refused by the quality gate: {exc}", flush=True)
            continue
        ref = ref or reference(engine)  # fp32 comes first
        results[name] = ConfigResult(name, kv_tokens_per_gib=engine.runner.num_blocks * engine.config.block_size
                                   / engine.config.kv_cache_memory_gb, **quality(engine, ref))
        _greedy(engine, prompt, 8)
        engines[name] = engine
        print(f"{name}: loaded, agreement {results[name].agreement:.1%}", flush=True)
    best: dict[str, tuple[float, float]] = {}  # (TTFT, TPOT) seconds, each the best of the rounds
    mbu_before = {name: _decode_mbu_totals(engine) for name, engine in engines.items()}
    for round_ in range(args.rounds):
        for name in engines if round_ % 2 == 0 else reversed(list(engines)):
            torch.set_num_threads(max(1, args.threads // CONFIGS[name][2]))
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
    for engine in engines.values():
        engine.close()
    base = results["fp32"]
    print(f"\nbatch 1, {args.prompt_tokens}-token prompt, {args.output_tokens} tokens, best of {args.rounds}; "
          f"quality: 16 prompts x 64 tokens, perplexity on the Gettysburg Address "
          f"(fp32 {ref.text_perplexity:.2f})" if ref else "")
    print(f"{'config':<14}{'TTFT ms':>9}{'TPOT ms':>9}{'tok/s':>8}{'x fp32':>8}{'MBU':>7}{'KV tok/GiB':>12}"
          f"{'agree':>8}{'max err':>9}{'mean err':>9}{'ppl':>8}")
    for r in results.values():
        if r.refused:
            print(f"{r.config:<14}  refused by the quality gate")
            continue
        ratio = r.decode_tok_s / base.decode_tok_s if base.decode_tok_s else math.nan
        print(f"{r.config:<14}{r.ttft_ms:>9.0f}{r.tpot_ms:>9.1f}{r.decode_tok_s:>8.1f}{ratio:>8.2f}{(r.mbu or 0):>7.3f}"
              f"{r.kv_tokens_per_gib:>12.0f}{r.agreement:>8.1%}{r.max_logit_error:>9.3f}{r.mean_logit_error:>9.4f}"
              f"{r.perplexity:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "reference_perplexity": ref.text_perplexity if ref else None,
                       "configs": [asdict(r) for r in results.values()]}, f, indent=2)
    return 0
