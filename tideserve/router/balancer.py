"""Which worker gets a request: prefix affinity bounded by load, or round-robin / least-outstanding.

Pure logic, no I/O: the HTTP router (tideserve.router.server) and the simulator (tideserve.sim) route with the
same objects, so the autoscaler's evaluation sees the cache effects the product has.

Prefix affinity works on chained hashes of the prompt's leading blocks (token ids when the request carries
them, else characters), the same chaining the workers' prefix cache uses, so a shared system prompt or
conversation history hashes to the same chain on every request. The router remembers, per worker, the block
hashes it sent there (an LRU bounded per worker, by default to what the worker's KV cache holds), which
estimates what that worker has cached without asking it.

Affinity alone would pile a hot prefix onto one worker, and on a busy worker every request waits longer than
the prefill a cache hit saves (on this project's CPU workers, a decode batch one sequence larger slows every
step). So load comes first: requests go to the least-loaded workers, and among those to the one holding the
longest prefix (ties: the least prompt tokens queued for prefill there). Only a hit worth it, at least half the
prompt and four blocks, may take a request to a busier worker, and then only within a slack of the least-loaded
one's load (`load_factor - 1` times the mean load, at least one request), in the spirit of consistent hashing
with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018). A worker's load is what this router has in flight
there plus what the worker reported running and waiting beyond that at the last refresh (other router replicas'
requests), and a worker whose KV cache is nearly full is no candidate while another is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import OrderedDict
from typing import Hashable, Sequence

POLICIES = ("prefix", "least-outstanding", "round-robin")
TOKEN_BLOCK = 16  # the workers' KV block size (worker.config.EngineConfig.block_size)
CHAR_BLOCK = 64  # about 16 tokens of English text
MAX_BLOCKS = 512  # leading blocks hashed per request: bounds the router's work on 100k-token prompts
DEFAULT_BLOCKS_PER_WORKER = 8192
KV_FULL = 0.95
MIN_AFFINITY_BLOCKS = 4  # a hit that may take a request to a busier worker: at least this many blocks
MIN_AFFINITY_SHARE = 0.5  # and at least this share of the prompt


def block_hashes(prompt: str | Sequence[int], max_blocks: int = MAX_BLOCKS) -> list[bytes]:
    """Chained hashes of the prompt's full leading blocks (a partial last block is never cached by a worker).
    Stable across processes (blake2b, not Python's salted hash), so every router replica agrees."""
    if isinstance(prompt, str):
        size, data = CHAR_BLOCK, prompt.encode("utf-8", "surrogatepass")
        key = lambda i: data[i * size:(i + 1) * size]  # noqa: E731
        count = len(data) // size
    else:
        size, ids = TOKEN_BLOCK, list(prompt)
        key = lambda i: b"".join(int(t).to_bytes(4, "little", signed=True) for t in ids[i * size:(i + 1) * size])  # noqa: E731
        count = len(ids) // size
    hashes, previous = [], b"text" if isinstance(prompt, str) else b"tokens"
    for i in range(min(count, max_blocks)):
        previous = hashlib.blake2b(previous + key(i), digest_size=12).digest()
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Per worker: the block hashes recently routed there, least recently used evicted first."""

    def __init__(self, default_capacity: int = DEFAULT_BLOCKS_PER_WORKER):
        self.default_capacity = default_capacity
        self._blocks: dict[str, OrderedDict[Hashable, None]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, worker: str, blocks: int) -> None:
        self._capacity[worker] = max(1, int(blocks))
        self._evict(worker)

    def matched(self, worker: str, hashes: Sequence[Hashable]) -> int:
        """How many leading blocks of `hashes` the worker is believed to hold."""
        blocks = self._blocks.get(worker)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def record(self, worker: str, hashes: Sequence[Hashable]) -> None:
        """The blocks are now held by the worker. The prompt's tail becomes least recent of them, its head most
        recent, so eviction takes a chain from its end: a lost head block would void the match of every block
        after it (the same order vLLM's prefix cache frees blocks in)."""
        blocks = self._blocks.setdefault(worker, OrderedDict())
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        self._evict(worker)

    def forget(self, worker: str) -> None:
        self._blocks.pop(worker, None)
        self._capacity.pop(worker, None)

    def size(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    def _evict(self, worker: str) -> None:
        blocks = self._blocks.get(worker)
        capacity = self._capacity.get(worker, self.default_capacity)
        while blocks is not None and len(blocks) > capacity:
            blocks.popitem(last=False)


@dataclasses.dataclass
class WorkerLoad:
    """What the router knows of one routable worker's load."""
    name: str
    in_flight: int = 0  # requests this router has open there
    prefill_tokens: int = 0  # prompt tokens (less cached prefixes) of those not yet past their first token
    other_requests: float = 0.0  # running + waiting the worker reported beyond this router's own, at the last refresh
    kv_usage: float = 0.0  # from the worker's metrics, 0..1

    def reported(self, running_and_waiting: float) -> None:
        """The worker's own count of its requests, read from its metrics just now."""
        self.other_requests = max(0.0, running_and_waiting - self.in_flight)

    @property
    def load(self) -> float:
        return self.in_flight + self.other_requests


@dataclasses.dataclass(frozen=True)
class Choice:
    worker: str
    reason: str  # prefix | prefix-spill | least-loaded | least-outstanding | round-robin
    matched_blocks: int = 0


class Balancer:
    def __init__(self, policy: str = "prefix", load_factor: float = 1.25, index: PrefixIndex | None = None,
                 block_tokens: int = TOKEN_BLOCK):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1 (1 = perfectly balanced, no affinity beyond ties)")
        self.policy = policy
        self.load_factor = load_factor
        self.index = index or PrefixIndex()
        self.block_tokens = block_tokens  # prompt tokens per hashed block (about the same for text blocks)
        self._turn = itertools.count()

    def choose(self, workers: Sequence[WorkerLoad], hashes: Sequence[Hashable], prompt_tokens: int = 0) -> Choice | None:
        """The worker for a request whose prompt has these block hashes; None with no worker. Call `sent` once
        the worker has taken the request."""
        if not workers:
            return None
        if self.policy == "prefix":
            return self._prefix_choice(workers, hashes, prompt_tokens)
        if self.policy == "round-robin":
            name, reason = workers[next(self._turn) % len(workers)].name, "round-robin"
        else:
            name, reason = min(workers, key=_least_loaded).name, "least-outstanding"
        return Choice(name, reason, self.index.matched(name, hashes))

    def sent(self, choice: Choice, hashes: Sequence[Hashable]) -> None:
        """The chosen worker took the request (a refusal does not count): its prefix is now believed held there,
        under every policy, so that the prefix-hit estimate (Choice.matched_blocks) compares policies."""
        self.index.record(choice.worker, hashes)

    def _prefix_choice(self, workers: Sequence[WorkerLoad], hashes: Sequence[Hashable], prompt_tokens: int) -> Choice:
        roomy = [w for w in workers if w.kv_usage < KV_FULL] or list(workers)
        least = min(w.load for w in roomy)
        slack = max(1.0, (self.load_factor - 1.0) * (sum(w.load for w in workers) + 1) / len(workers))
        matched = {w.name: self.index.matched(w.name, hashes) for w in workers}
        worth = max(MIN_AFFINITY_BLOCKS, MIN_AFFINITY_SHARE * prompt_tokens / self.block_tokens)
        affine = [w for w in roomy if w.load <= least + slack and matched[w.name] >= worth]
        pool = affine or [w for w in roomy if w.load <= least]
        best = min(pool, key=lambda w: (-matched[w.name], w.load, w.prefill_tokens, w.name))
        most = max(matched.values())
        reason = "least-loaded" if most == 0 else "prefix" if matched[best.name] == most else "prefix-spill"
        return Choice(best.name, reason, matched[best.name])

    def uncached_tokens(self, choice: Choice, prompt_tokens: int) -> int:
        """The prompt tokens the chosen worker is expected to prefill (its believed prefix left out)."""
        return max(0, prompt_tokens - choice.matched_blocks * self.block_tokens)


def _least_loaded(w: WorkerLoad) -> tuple[float, int, str]:
    return (w.load, w.prefill_tokens, w.name)
