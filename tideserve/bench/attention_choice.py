"""Our engine (paged attention through transformers' AttentionInterface) against transformers' own continuous
batching (`generate_batch` / `ContinuousBatchingManager` with `PagedAttentionCache`), on one workload, in one run.

    python3 bench/attention_choice.py --model smollm2 --num-requests 32

The workload: N (prompt, completion) length pairs drawn from the Azure 2023 conversation trace, scaled to fit
--max-model-len (input x0.1, output x0.5, output clamped to 128 by default), prompts of random common words
(tokenized, then cut or padded to the exact length), greedy decoding, EOS ignored so each request produces exactly
its completion length. Both sides get the same batch limits (N sequences, --max-num-batched-tokens per step), the
same KV capacity and block size, float32 on CPU, the same number of torch threads (--threads, default 1), and a
short warm-up before the timed part; model loading and cache allocation are outside the timed part. transformers'
manager always runs its generation loop in a background thread, so by default our engine's step loop runs in one
too, as AsyncEngine runs it in the server (--engine-thread main to change that). Each side reports wall time, this
process's CPU time and the CPU time other processes used meanwhile: on a shared machine only runs where the last is
near zero are comparable. The script then compares the greedy tokens of both sides request by
request (and, with --reference K, against `model.generate` on the first K requests).

For transformers the attention implementations are tried in order (--hf-impls); one that cannot be loaded or run
is reported with its error text instead of a number. docs/engine.md records the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tideserve.bench.loadgen import make_prompt  # noqa: E402
from tideserve.traces import load_trace, scale_tokens  # noqa: E402

# Tried in this order. In transformers 5.23 only "sdpa", "paged|eager" and the flash implementations run under
# continuous batching (ContinuousBatchingManager.switch_to_cb_friendly_attn); the others are tried to record why not.
DEFAULT_HF_IMPLS = (
    "sdpa_paged", "sdpa", "paged|eager", "paged|sdpa", "paged_attention", "flex_attention", "flash_attention_2"
)


# --------------------------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Wall time, this process's CPU time (all threads), and the CPU time every other process on the machine used
    meanwhile (from /proc/stat; None elsewhere). The last one tells a clean measurement from one that shared the
    cores with other work."""

    def __enter__(self):
        self.wall, self.cpu, self.machine = time.perf_counter(), time.process_time(), _machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        machine = _machine_busy_seconds()
        self.others = None if machine is None or self.machine is None else max(0.0, machine - self.machine - self.cpu)
        return False


def _machine_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------------------------
# Workload


def build_workload(args, tokenizer) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, deterministic in --seed."""
    rng = random.Random(args.seed)
    trace = load_trace(args.trace)
    sampled = rng.choices(trace, k=args.num_requests)
    scaled = scale_tokens(
        sampled, args.input_scale, args.output_scale, max_output=args.max_output_tokens, max_total=args.max_model_len
    )
    special = set(tokenizer.all_special_ids)
    workload = []
    for r in scaled:
        ids = [t for t in tokenizer.encode(make_prompt(r.input_tokens, rng), add_special_tokens=False)
               if t not in special]
        while len(ids) < r.input_tokens:  # a word can merge with its neighbour; top up with more words
            ids += tokenizer.encode(make_prompt(r.input_tokens, rng), add_special_tokens=False)
        workload.append((ids[: r.input_tokens], r.output_tokens))
    return workload


def warmup_workload(vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(12345)
    return [([rng.randrange(100, vocab) for _ in range(n)], 4) for n in (24, 40)]


# --------------------------------------------------------------------------------------------------------------------
# (a) our engine


def run_engine(args, model_dir: str, workload) -> dict:
    from tideserve.worker.config import EngineConfig
    from tideserve.worker.engine import LLMEngine
    from tideserve.worker.sequence import SamplingParams

    n = len(workload)
    t0 = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype="float32",
            device="cpu",
            max_model_len=args.max_model_len,
            max_num_seqs=n,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            num_kv_blocks=args.num_blocks,
            seed=args.seed,
        )
    )
    setup_s = time.perf_counter() - t0

    def drive(requests, prefix):
        outputs: dict[str, list[int]] = {f"{prefix}{i}": [] for i in range(len(requests))}
        for i, (prompt, out_len) in enumerate(requests):
            engine.submit(f"{prefix}{i}", prompt, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
        steps = 0
        while engine.has_work():
            for out in engine.step():
                outputs[out.request_id].extend(out.token_ids)
            steps += 1
        return [outputs[f"{prefix}{i}"] for i in range(len(requests))], steps

    def measure(out: dict) -> None:
        drive(warmup_workload(len(engine.tokenizer)), "warmup-")
        with Timer() as out["timer"]:
            out["tokens"], out["steps"] = drive(workload, "req-")

    preempt_before = engine.scheduler.num_preemptions
    measured: dict = {}
    if args.engine_thread == "background":
        # As in the server, where AsyncEngine steps the engine in its own thread, and as transformers'
        # ContinuousBatchingManager runs its generation loop: both sides then issue torch ops from a non-main thread.
        worker = threading.Thread(target=measure, args=(measured,), name="engine-loop")
        worker.start()
        worker.join()
        if "timer" not in measured or not hasattr(measured["timer"], "others"):
            raise RuntimeError("the engine thread failed (see its traceback above)")
    else:
        measure(measured)
    timer, tokens, steps = measured["timer"], measured["tokens"], measured["steps"]
    result = {
        "name": "tideserve engine",
        "attn_implementation": engine.runner.model.config._attn_implementation,
        "engine_thread": args.engine_thread,
        "seconds": timer.wall,
        "cpu_seconds": timer.cpu,
        "others_cpu_seconds": timer.others,
        "setup_seconds": setup_s,
        "steps": steps,
        "preemptions": engine.scheduler.num_preemptions - preempt_before,
        "tokens": tokens,
    }
    return result  # the engine and its KV pool go with this frame


# --------------------------------------------------------------------------------------------------------------------
# (b) transformers continuous batching


def run_transformers_cb(args, model_dir: str, workload, impl: str, measured: set[str]) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    n = len(workload)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl).eval()
    resolved = model.config._attn_implementation
    if resolved in measured:  # e.g. the deprecated "paged|sdpa" alias is loaded as plain "sdpa"
        del model
        gc.collect()
        return {"name": "transformers CB", "requested_impl": impl, "skipped": f"loads as {resolved!r}, already measured"}
    # Greedy; eos_token_id=-1 disables EOS (RequestState keeps only non-negative EOS ids), so every request runs to
    # its own max_new_tokens, which add_request takes per request (generate_batch only takes one for all requests).
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(o for _, o in workload), eos_token_id=-1,
                                  pad_token_id=model.config.pad_token_id or 0)
    cb_config = ContinuousBatchingConfig(
        page_size=args.block_size,
        num_blocks=args.num_blocks,  # whole-model blocks of page_size tokens, as the engine's num_kv_blocks
        max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=n,
        scheduler_type="fifo",
        seed=args.seed,
    )

    def drive(manager, requests, prefix):
        for i, (prompt, out_len) in enumerate(requests):
            manager.add_request(prompt, request_id=f"{prefix}{i}", max_new_tokens=out_len, eos_token_id=-1)
        results = {}
        while len(results) < len(requests):
            r = manager.get_result(timeout=args.hf_result_timeout)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError(
                        f"generation thread stopped; fatal error: {manager.background_thread_status.fatal_error!r}"
                    )
                raise RuntimeError(f"no result within {args.hf_result_timeout}s")
            if r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"request {r.request_id} failed: {r.error}")
                results[r.request_id] = list(r.generated_tokens)
        return [results[f"{prefix}{i}"] for i in range(len(requests))]

    with model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=30
    ) as manager:
        drive(manager, warmup_workload(model.config.vocab_size), "warmup-")
        setup_s = time.perf_counter() - t0
        used_impl = model.config._attn_implementation
        with Timer() as timer:  # process CPU time includes the manager's generation thread
            tokens = drive(manager, workload, "req-")
        resolved_cb = manager.continuous_batching_config
        details = {
            "page_size": resolved_cb.page_size,
            "num_blocks": resolved_cb.num_blocks,
            "max_batch_tokens": resolved_cb.max_batch_tokens,
            "max_requests_per_batch": resolved_cb.max_requests_per_batch,
            "use_cuda_graph": resolved_cb.use_cuda_graph,
            "use_async_batching": resolved_cb.use_async_batching,
            "decode_fast_path_blocks": resolved_cb.max_blocks_per_request,
        }
    result = {
        "name": "transformers CB",
        "requested_impl": impl,
        "attn_implementation": f"{resolved} (during CB: {used_impl})" if resolved != used_impl else resolved,
        "seconds": timer.wall,
        "cpu_seconds": timer.cpu,
        "others_cpu_seconds": timer.others,
        "setup_seconds": setup_s,
        "cb_config": details,
        "tokens": tokens,
    }
    del model
    gc.collect()
    return result


def reference_generate(model_dir: str, workload, k: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt, n in workload[:k]:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            out.append(ids[0, len(prompt):].tolist())
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    div = [first_divergence(x, y) for x, y in zip(a, b)]
    return {"match": sum(d is None for d in div), "total": len(div), "first_divergence": div}


def summarize(result: dict, workload) -> dict:
    out_tokens = sum(len(t) for t in result["tokens"])
    prompt_tokens = sum(len(p) for p, _ in workload)
    exact = sum(len(t) == n for t, (_, n) in zip(result["tokens"], workload))
    result.update(
        output_tokens=out_tokens,
        exact_length_requests=exact,
        output_tok_s=out_tokens / result["seconds"],
        total_tok_s=(out_tokens + prompt_tokens) / result["seconds"],
    )
    return result


def fastest(runs: list[dict]) -> dict:
    """The fastest of a system's rounds, with every round's times and whether all rounds produced the same tokens."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    best["all_cpu_seconds"] = [round(r["cpu_seconds"], 3) for r in runs]
    best["all_others_cpu_seconds"] = [None if r["others_cpu_seconds"] is None else round(r["others_cpu_seconds"], 3)
                                      for r in runs]
    best["same_tokens_every_round"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return best


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_table(rows: list[dict]) -> None:
    """time s: wall time of the timed part; CPU s: this process (all threads); cores: CPU s / time s, the cores
    kept busy on average; others: CPU seconds used by every other process meanwhile, near 0 for a clean comparison."""
    header = (f"{'engine':<18} {'attention':<26} {'time s':>8} {'CPU s':>8} {'cores':>6} {'others':>8} {'out tok':>8} "
              f"{'out tok/s':>10} {'total tok/s':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<18} {r['requested_impl']:<26} {'failed: ' + r['error'].splitlines()[0][:100]}")
        elif "skipped" in r:
            print(f"{r['name']:<18} {r['requested_impl']:<26} skipped: {r['skipped']}")
        else:
            print(
                f"{r['name']:<18} {r['attn_implementation'][:26]:<26} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
                f"{r['cpu_seconds'] / r['seconds']:>6.2f} {_num(r['others_cpu_seconds']):>8} {r['output_tokens']:>8d} "
                f"{r['output_tok_s']:>10.1f} {r['total_tok_s']:>12.1f}"
            )


def code_version() -> str:
    """The commit the engine code comes from, and whether worker/ has uncommitted changes (best effort)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [f for f in dirty if f.startswith("worker/")]
    return f"{head or 'unknown'}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="built-in model name or model directory (resolve_model)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--trace", default="azure-conv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-scale", type=float, default=0.1)
    p.add_argument("--output-scale", type=float, default=0.5)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step, both sides")
    p.add_argument("--block-size", type=int, default=16, help="KV block (page) size in tokens, both sides")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks, both sides (default: enough for every request at max-model-len)")
    p.add_argument("--hf-impls", default=",".join(DEFAULT_HF_IMPLS),
                   help="transformers attn_implementation values to try, in order (a duplicate of one already "
                        "measured after transformers resolves it is skipped)")
    p.add_argument("--hf-result-timeout", type=float, default=120.0, help="seconds without any finished request")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds: each round runs the engine, then every transformers implementation that ran in the "
                        "first round; the table shows each system's fastest round (all rounds go to --json)")
    p.add_argument("--check", type=int, default=8, help="requests listed one by one in the agreement check")
    p.add_argument("--reference", type=int, default=0,
                   help="also run model.generate (sdpa, one request at a time) on the first K requests")
    p.add_argument("--engine-thread", choices=("background", "main"), default="background",
                   help="where our engine's step loop runs: a background thread, as in the server (AsyncEngine) "
                        "and as transformers' manager runs its loop (default), or the main thread")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both sides (default 1: one core each, which keeps the two sides "
                        "equal; with more, torch ops from the main thread and from a background thread did not use "
                        "the same number of cores on the 2-core machine this was written on). 0: torch's default")
    p.add_argument("--json", default=None, help="write settings, results and agreement to this file")
    args = p.parse_args(argv)
    if args.num_blocks is None:
        args.num_blocks = args.num_requests * math.ceil(args.max_model_len / args.block_size)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoTokenizer

    from tideserve.worker.builtin_models import resolve_model

    model_dir = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workload = build_workload(args, tokenizer)
    prompt_tokens = sum(len(p) for p, _ in workload)
    wanted = sum(n for _, n in workload)
    print(
        f"model {args.model} ({model_dir}), float32 on CPU, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), transformers "
        f"{transformers.__version__}; engine code {code_version()}"
    )
    print(
        f"workload: {len(workload)} requests from {args.trace} (seed {args.seed}, input x{args.input_scale}, output "
        f"x{args.output_scale} clamped to {args.max_output_tokens}, max_model_len {args.max_model_len}): "
        f"{prompt_tokens} prompt tokens (mean {prompt_tokens / len(workload):.0f}, max "
        f"{max(len(p) for p, _ in workload)}), {wanted} output tokens (mean {wanted / len(workload):.0f}, max "
        f"{max(n for _, n in workload)}); greedy, EOS ignored"
    )
    print(f"our engine steps in the {args.engine_thread} thread; transformers' manager in its own background thread")
    print(
        f"both sides: {len(workload)} sequences, {args.max_num_batched_tokens} tokens per step, {args.num_blocks} KV "
        f"blocks of {args.block_size} tokens\n",
        flush=True,
    )

    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min); other busy processes "
          "slow either side and make the comparison meaningless: check the 'others' column", flush=True)
    impls = [s.strip() for s in args.hf_impls.split(",") if s.strip()]
    rounds = max(1, args.repeat)
    ours_runs: list[dict] = []
    hf_runs: dict[str, list[dict]] = {}  # requested implementation -> one result per round
    not_run: dict[str, dict] = {}  # requested implementation -> its error or skip record
    measured_impls: set[str] = set()
    for rnd in range(rounds):
        tag = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
        print(f"(a) tideserve engine{tag} ...", flush=True)
        r = summarize(run_engine(args, model_dir, workload), workload)
        ours_runs.append(r)
        print(f"    {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} CPU s; other processes {_num(r['others_cpu_seconds'])} "
              f"CPU s), {r['steps']} steps, {r['preemptions']} preemptions", flush=True)
        for impl in impls:
            if impl in not_run or (rnd > 0 and impl not in hf_runs):
                continue
            print(f"(b) transformers continuous batching, attn_implementation={impl!r}{tag} ...", flush=True)
            try:
                r = run_transformers_cb(args, model_dir, workload, impl, measured_impls if rnd == 0 else set())
                if "skipped" in r:
                    print(f"    skipped: {r['skipped']}", flush=True)
                    not_run[impl] = r
                    continue
                r = summarize(r, workload)
            except Exception as e:  # record exactly why this implementation cannot run here
                err = f"{type(e).__name__}: {e}"
                print(f"    failed: {err}", flush=True)
                if os.environ.get("ATTN_CHOICE_TRACEBACK"):
                    traceback.print_exc()
                not_run[impl] = {"name": "transformers CB", "requested_impl": impl, "error": err}
                gc.collect()
                continue
            measured_impls.add(r["attn_implementation"])
            hf_runs.setdefault(impl, []).append(r)
            print(f"    {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} CPU s; other processes "
                  f"{_num(r['others_cpu_seconds'])} CPU s); resolved config {r['cb_config']}", flush=True)

    ours = fastest(ours_runs)
    rows = [ours] + [not_run[i] if i in not_run else fastest(hf_runs[i]) for i in impls if i in not_run or i in hf_runs]
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)")
    print()
    print_table(rows)
    busy = [r for r in rows if (r.get("others_cpu_seconds") or 0) > 0.05 * r.get("seconds", 0)]
    if busy:
        print("\nWARNING: other processes used the CPU during "
              + ", ".join(f"{r.get('attn_implementation')} ({r['others_cpu_seconds']:.1f} CPU s)" for r in busy)
              + f": with {os.cpu_count()} cores, sharing them can skew these times; rerun on a quiet machine")
    if rounds > 1:
        print(f"\nfastest of {rounds} rounds shown; all rounds (s): "
              + "; ".join(f"{r.get('attn_implementation', r['name'])} {r['all_seconds']}" for r in rows
                          if "all_seconds" in r)
              + "; same tokens every round: "
              + str(all(r["same_tokens_every_round"] for r in rows if "all_seconds" in r)))
    print()
    hf_rows = [r for r in rows[1:] if "error" not in r and "skipped" not in r]
    agreement = {}
    for r in hf_rows:
        ratio = ours["output_tok_s"] / r["output_tok_s"]
        cmp = compare(ours["tokens"], r["tokens"])
        agreement[r["attn_implementation"]] = cmp
        r["ratio_ours_over_this"] = ratio
        print(f"ratio (a)/(b) output tok/s vs {r['attn_implementation']}: {ratio:.2f}x")
        print(
            f"greedy agreement with {r['attn_implementation']}: {cmp['match']}/{cmp['total']} requests identical "
            f"token-for-token; first {min(args.check, cmp['total'])}: "
            + ", ".join(
                f"#{i}:" + ("same" if d is None else f"differs@{d}/{len(ours['tokens'][i])}")
                for i, d in enumerate(cmp["first_divergence"][: args.check])
            )
        )
    print(
        f"exact output lengths: engine {ours['exact_length_requests']}/{len(workload)}"
        + "".join(f", {r['attn_implementation']} {r['exact_length_requests']}/{len(workload)}" for r in hf_rows)
    )

    reference = None
    if args.reference:
        print(f"\nreference: model.generate (sdpa, one request at a time) on the first {args.reference} requests", flush=True)
        ref_tokens = reference_generate(model_dir, workload, args.reference)
        reference = {"engine": compare(ours["tokens"][: args.reference], ref_tokens)}
        for r in hf_rows:
            reference[r["attn_implementation"]] = compare(r["tokens"][: args.reference], ref_tokens)
        for name, cmp in reference.items():
            print(f"    {name}: {cmp['match']}/{cmp['total']} identical to generate; first divergence "
                  f"{cmp['first_divergence']}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "argv": sys.argv,
                    "settings": vars(args),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "engine_code": code_version(),
                    "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "workload": [[len(p), n] for p, n in workload],
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "results": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                    "agreement": agreement,
                    "reference": reference,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
