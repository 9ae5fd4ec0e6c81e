"""`tideserve bench-routing`: the router's policies side by side on shared-prefix traffic, in one run.

The workload is the Mooncake synthetic trace (long contexts whose `hash_ids` name 512-token blocks; a hash id
that recurs is the same block of text, a shared prefix). Each hash id becomes a fixed block of token ids, and
every token count is scaled down by the same factor (a 512-token block becomes 16 tokens, the workers' KV block
size, and outputs shrink alike) so that the prompts fit a small model's context on CPU. The first `count`
requests whose scaled prompt and output fit the context are replayed at their trace arrival times (compressed by
`speedup`) against `tideserve up`'s runtime: two replicas of the demo deployment behind the router, autoscaling
off, fresh workers for each replay so that no policy inherits another's cache; `rounds` replays per policy in
rotated order, latencies pooled.

Reported per policy: the workers' prefix-cache hit rate (vllm:prefix_cache_hits over queries, in prompt tokens),
the router's own estimate, TTFT and end-to-end percentiles; and the prefix policy's TTFT against each other
policy as ratios from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import httpx

from tideserve.autoscaler.scrape import parse_exposition
from tideserve.traces import TraceRequest, load_trace

SOURCE_BLOCK = 512  # tokens per Mooncake hash id
VOCAB = (1000, 40000)  # token ids drawn for block text: ordinary vocabulary of the demo model's tokenizer
WARMUP_TOKENS = (45000, 49000)  # disjoint from VOCAB: the warm-up shares no block with the trace
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def block_tokens(hash_id: int, length: int) -> list[int]:
    rng = random.Random(hash_id)
    return [rng.randrange(*VOCAB) for _ in range(length)]


def mooncake_prefix_workload(path: str | Path, count: int = 300, block: int = 16, max_context: int = 512,
                             speedup: float = 1.0) -> tuple[list[TraceRequest], float]:
    """The first `count` requests that fit, as TraceRequests with their prompts; and the share of the slice's
    prompt blocks that an earlier request of the slice already had (what a perfect prefix cache could reuse)."""
    scale = block / SOURCE_BLOCK
    requests, seen, blocks, shared = [], set(), 0, 0
    for r in load_trace(path):
        if len(requests) >= count:
            break
        hashes = r.prefix_blocks
        if not hashes:
            continue
        output = max(2, round(r.output_tokens * scale))
        last = max(1, round((r.input_tokens - SOURCE_BLOCK * (len(hashes) - 1)) * scale))
        prompt = [t for h in hashes[:-1] for t in block_tokens(h, block)] + block_tokens(hashes[-1], min(last, block))
        if len(prompt) + output > max_context:
            continue
        full = hashes if last >= block else hashes[:-1]  # a partial last block is never cached
        blocks += len(full)
        shared += sum(1 for h in full if h in seen)
        seen.update(full)
        requests.append(TraceRequest(r.arrival_s / speedup, len(prompt), output, tuple(prompt)))
    if not requests:
        raise ValueError(f"{path}: no request with hash_ids fits a {max_context}-token context")
    start = requests[0].arrival_s
    return [TraceRequest(r.arrival_s - start, r.input_tokens, r.output_tokens, r.prompt_token_ids)
            for r in requests], (shared / blocks if blocks else 0.0)


async def _prefix_counters(client: httpx.AsyncClient, urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        metrics = parse_exposition((await client.get(f"{url}/metrics")).text)
        hits += metrics.value(HITS) or 0.0
        queries += metrics.value(QUERIES) or 0.0
    return hits, queries


async def run_policy(llmd: dict[str, Any], policy: str, workload: list[TraceRequest], log_dir: Path) -> dict[str, Any]:
    """One replay of the workload against fresh workers behind the router with this policy: the raw latencies
    and the counters, to pool over rounds."""
    from tideserve.bench.loadgen import BenchConfig, run_benchmark
    from tideserve.ports import free_port
    from tideserve.local.runtime import LocalRuntime

    llmd = json.loads(json.dumps(llmd))
    llmd["spec"]["router"]["policy"] = policy
    runtime = LocalRuntime(llmd, port=free_port(), log_dir=log_dir, calibrate=False)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.started.wait(), 600)
        while len(runtime._routable()) < llmd["spec"]["replicas"]:
            await asyncio.sleep(0.2)
        urls = [r.url for r in runtime.replicas]
        async with httpx.AsyncClient(timeout=120) as client:
            rng = random.Random(0)
            for url in urls:  # the first request of a worker pays torch's warm-up: not the policy's doing
                warm = {"model": llmd["spec"]["model"]["name"], "max_tokens": 2,
                        "prompt": [rng.randrange(*WARMUP_TOKENS) for _ in range(64)]}
                (await client.post(f"{url}/v1/completions", json=warm)).raise_for_status()
            hits0, queries0 = await _prefix_counters(client, urls)
            result = await run_benchmark(BenchConfig(base_url=runtime.url, workload=workload,
                                                     model=llmd["spec"]["model"]["name"], label=policy))
            hits1, queries1 = await _prefix_counters(client, urls)
            router = parse_exposition((await client.get(f"{runtime.url}/metrics")).text)
        done = [r for r in result.records if r.success]
        return {
            "ttft_s": [r.ttft_s for r in done], "e2e_s": [r.e2e_s for r in done],
            "failed": len(result.records) - len(done), "errors": result.summary.errors,
            "hit_tokens": hits1 - hits0, "query_tokens": queries1 - queries0,
            "matched_blocks": router.value("tideserve_router_prefix_matched_blocks_total") or 0.0,
            "hashed_blocks": router.value("tideserve_router_prefix_blocks_total") or 0.0,
            "retries": runtime.router.retried, "duration_s": result.summary.duration_s,
        }
    finally:
        stop.set()
        await asyncio.wait_for(serving, 300)


def pooled(policy: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's rounds as one row: latencies pooled, counters summed."""
    import numpy as np

    ttft = np.array([t for r in rounds for t in r["ttft_s"]]) * 1000
    e2e = np.array([t for r in rounds for t in r["e2e_s"]]) * 1000
    total = lambda key: sum(r[key] for r in rounds)  # noqa: E731
    errors: dict[str, int] = {}
    for r in rounds:
        for message, count in r["errors"].items():
            errors[message] = errors.get(message, 0) + count
    return {
        "policy": policy, "rounds": len(rounds), "completed": len(ttft), "failed": total("failed"), "errors": errors,
        "prefix_cache_hit_rate": total("hit_tokens") / total("query_tokens") if total("query_tokens") else 0.0,
        "router_prefix_estimate": total("matched_blocks") / total("hashed_blocks") if total("hashed_blocks") else 0.0,
        "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p90_ms": float(np.percentile(ttft, 90)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)), "e2e_p50_ms": float(np.percentile(e2e, 50)),
        "e2e_p90_ms": float(np.percentile(e2e, 90)), "retries": total("retries"),
        "per_round_ttft_p50_ms": [float(np.percentile(r["ttft_s"], 50) * 1000) for r in rounds],
        "per_round_ttft_p90_ms": [float(np.percentile(r["ttft_s"], 90) * 1000) for r in rounds],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| policy | completed | failed | prefix-cache hit rate | router estimate | TTFT p50 | TTFT p90 | TTFT p99 | "
             "E2E p50 | TTFT p50, p90 per round |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_round = "; ".join(f"{a:.0f}, {b:.0f}" for a, b in zip(r["per_round_ttft_p50_ms"], r["per_round_ttft_p90_ms"]))
        lines.append(f"| {r['policy']} | {r['completed']} | {r['failed']} | {100 * r['prefix_cache_hit_rate']:.1f}% | "
                     f"{100 * r['router_prefix_estimate']:.1f}% | {r['ttft_p50_ms']:.0f} ms | {r['ttft_p90_ms']:.0f} ms | "
                     f"{r['ttft_p99_ms']:.0f} ms | {r['e2e_p50_ms']:.0f} ms | {per_round} |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The prefix policy's TTFT p50/p90 over each other policy's (below 1: prefix routing is faster)."""
    by = {r["policy"]: r for r in rows}
    prefix = by.get("prefix")
    if prefix is None:
        return {}
    return {name: {"ttft_p50": prefix["ttft_p50_ms"] / r["ttft_p50_ms"], "ttft_p90": prefix["ttft_p90_ms"] / r["ttft_p90_ms"],
                   "hit_rate_gain_pp": 100 * (prefix["prefix_cache_hit_rate"] - r["prefix_cache_hit_rate"])}
            for name, r in by.items() if name != "prefix"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default="../shared/traces/mooncake/synthetic_trace.jsonl",
                        help="a Mooncake JSON-lines trace with hash_ids")
    parser.add_argument("--count", type=int, default=300, help="requests replayed (the first that fit)")
    parser.add_argument("--speedup", type=float, default=1.0, help="compress the trace's arrival times")
    parser.add_argument("--policies", default="prefix,least-outstanding,round-robin")
    parser.add_argument("--rounds", type=int, default=2,
                        help="replays per policy, in rotated order (prefix, lo, rr; lo, rr, prefix; ...) so that a "
                             "drift of the machine over the run does not favour one policy; latencies are pooled")
    parser.add_argument("--file", help="the LLMDeployment to run (default: the demo's, with 2 replicas, "
                                       "autoscaling off and a 512-token context)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--log-dir", default="/tmp/tideserve-bench-routing")


def run(args: argparse.Namespace) -> int:
    from tideserve.local import deployment
    from tideserve.local.demo import DEMO_YAML

    logging.basicConfig(level="WARNING")
    try:
        workload, shared = mooncake_prefix_workload(args.trace, args.count, speedup=args.speedup)
        llmd = deployment.load(args.file or Path(deployment.__file__).parent.parent / "data" / DEMO_YAML)
    except (OSError, ValueError, deployment.DeploymentError) as exc:
        print(f"tideserve bench-routing: {exc}", file=sys.stderr)
        return 2
    if not args.file:
        llmd["spec"]["replicas"] = 2
        llmd["spec"]["autoscaling"]["mode"] = "off"
        llmd["spec"]["engine"]["maxModelLen"] = 512
    print(f"{len(workload)} requests over {workload[-1].arrival_s:.0f} s; {100 * shared:.1f}% of their prompt blocks "
          f"were in an earlier request of the slice; prompts {min(r.input_tokens for r in workload)}-"
          f"{max(r.input_tokens for r in workload)} tokens", flush=True)
    policies = args.policies.split(",")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for k in range(args.rounds):
        for policy in policies[k % len(policies):] + policies[:k % len(policies)]:
            runs[policy].append(asyncio.run(run_policy(llmd, policy, workload, Path(args.log_dir) / f"{policy}-{k}")))
            last = runs[policy][-1]
            print(f"round {k + 1}, {policy}: {len(last['ttft_s'])} completed, {last['failed']} failed", flush=True)
    rows = [pooled(p, runs[p]) for p in policies]
    print(format_table(rows))
    for name, r in ratios(rows).items():
        print(f"prefix / {name}: TTFT p50 x{r['ttft_p50']:.2f}, p90 x{r['ttft_p90']:.2f}, "
              f"hit rate {r['hit_rate_gain_pp']:+.1f} pp")
    if args.json:
        Path(args.json).write_text(json.dumps({"shared_block_share": shared, "requests": len(workload),
                                               "policies": rows, "ratios": ratios(rows)}, indent=2))
    return 0
