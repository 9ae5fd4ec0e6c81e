"""Static vs continuous batching on one machine, in one run (docs/benchmarks.md records the results).

Workload: N requests whose prompt and output lengths are drawn from the Azure LLM inference trace 2023
(conversation), scaled to fit --max-model-len, all available at t=0 (offline throughput). Every request
produces exactly its output length (EOS ignored), so all systems generate the same useful tokens.

Systems, measured one after the other on the same model weights:
  sequential  transformers `generate` one request at a time;
  static      transformers `generate` on left-padded batches of --static-batch in arrival order, each batch
              decoding until its longest request is done (the shorter ones' extra tokens are waste);
  engine      the Tideserve engine, in each --engine-runs MODE:MAX_NUM_SEQS: by default continuous batching with
              64 sequences, and the engine's own static mode at 16 (the static baseline's batch size, but no
              padding); dynamic:16 and continuous:16 complete the three modes the literature compares.

Prints output tokens/s for each, the ratios against the generate baselines, and the engine's TTFT and TPOT
p50/p99 (from arrival at t=0). Run: python3 bench/batching.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

from tideserve.traces import load_trace, sample_lengths, scale_tokens


def build_workload(args, vocab_size: int, special_ids: set[int]) -> list[tuple[list[int], int]]:
    trace = scale_tokens(load_trace(args.trace), args.input_scale, args.output_scale,
                         max_output=args.max_output_tokens, max_total=args.max_model_len)
    lengths = sample_lengths(trace, args.num_requests, seed=args.seed)
    rng = random.Random(args.seed)
    usable = [t for t in range(vocab_size) if t not in special_ids]
    return [([rng.choice(usable) for _ in range(n_in)], n_out) for n_in, n_out in lengths]


def run_sequential(model, workload) -> float:
    start = time.perf_counter()
    for prompt, n_out in workload:
        model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def run_static(model, workload, batch_size: int, pad_id: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=pad_id)
    return time.perf_counter() - start


def run_engine(model_dir: str, workload, args, mode: str, max_num_seqs: int) -> dict:
    from tideserve.worker.config import EngineConfig
    from tideserve.worker.engine import LLMEngine
    from tideserve.worker.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(
        model=model_dir, dtype="float32", device="cpu", max_model_len=args.max_model_len,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max(args.max_num_batched_tokens, max_num_seqs),
        kv_cache_memory_gb=args.kv_cache_memory_gb, batching_mode=mode, batch_timeout_s=0.0,
        max_waiting_requests=len(workload) + 1,
    ))
    engine.submit("warm-up", workload[0][0][:16], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_work():  # first calls into the kernels are slow: keep them out of the timed part
        engine.step()
    start = time.monotonic()
    for i, (prompt, n_out) in enumerate(workload):
        engine.submit(str(i), prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
    first, last, count = {}, {}, {}
    while engine.has_work():
        for out in engine.step():
            now = time.monotonic()
            if out.token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                count[out.request_id] = out.completion_tokens
    elapsed = time.monotonic() - start
    ttft = np.array([first[r] - start for r in first])
    tpot = np.array([(last[r] - first[r]) / (count[r] - 1) for r in first if count[r] > 1])
    return {
        "seconds": elapsed,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p99_s": float(np.percentile(tpot, 99)),
        "preemptions": engine.scheduler.num_preemptions,
        "generated": sum(count.values()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="built-in name or local model directory")
    p.add_argument("--trace", default="azure-conv")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-scale", type=float, default=0.1)
    p.add_argument("--output-scale", type=float, default=0.5)
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--engine-runs", default="continuous:64,static:16",
                   help="comma-separated MODE:MAX_NUM_SEQS runs of the engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0)
    p.add_argument("--skip-sequential", action="store_true", help="leave out the slowest baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tideserve.worker.builtin_models import resolve_model

    model_dir = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    workload = build_workload(args, len(tokenizer), set(tokenizer.all_special_ids))
    useful = sum(n for _, n in workload)
    print(f"model {args.model}, {len(workload)} requests, {sum(len(p) for p, _ in workload)} prompt tokens, "
          f"{useful} output tokens, torch threads {torch.get_num_threads()}", flush=True)

    results: dict[str, dict] = {}
    with torch.inference_mode():
        warm = workload[0][0][:16]  # the baselines get the same warm-up as the engine
        model.generate(torch.tensor([warm]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        if not args.skip_sequential:
            results["sequential generate"] = {"seconds": run_sequential(model, workload)}
            print(f"sequential: {results['sequential generate']['seconds']:.1f} s", flush=True)
        results[f"static generate (batch {args.static_batch})"] = {
            "seconds": run_static(model, workload, args.static_batch, tokenizer.pad_token_id or 0)}
        print(f"static: {results[f'static generate (batch {args.static_batch})']['seconds']:.1f} s", flush=True)
    del model
    for run in args.engine_runs.split(","):
        mode, seqs = run.split(":")
        name = f"engine {mode} (max {seqs} seqs)"
        results[name] = run_engine(model_dir, workload, args, mode, int(seqs))
        assert results[name]["generated"] == useful
        print(f"{name}: {results[name]['seconds']:.1f} s", flush=True)

    for r in results.values():
        r["output_tokens_per_s"] = useful / r["seconds"]
    baselines = {k: v["output_tokens_per_s"] for k, v in results.items() if "generate" in k}
    print(f"\n{'system':<36}{'time s':>9}{'out tok/s':>11}  " + "  ".join(f"x {k.split()[0]}" for k in baselines)
          + f"{'TTFT p50/p99 s':>20}{'TPOT p50/p99 ms':>20}")
    for name, r in results.items():
        ratios = "  ".join(f"{r['output_tokens_per_s'] / b:>{len(k.split()[0]) + 2}.2f}" for k, b in baselines.items())
        latency = ""
        if "ttft_p50_s" in r:
            latency = (f"{r['ttft_p50_s']:>10.2f}/{r['ttft_p99_s']:<9.2f}"
                       f"{r['tpot_p50_s'] * 1e3:>10.1f}/{r['tpot_p99_s'] * 1e3:<9.1f}")
        print(f"{name:<36}{r['seconds']:>9.1f}{r['output_tokens_per_s']:>11.1f}  {ratios}{latency}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "output_tokens": useful, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
