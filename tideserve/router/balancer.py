"""Which worker gets a request: prefix affinity bounded by load, or round-robin / least-outstanding.

Pure logic, no I/O: the HTTP router (tideserve.router.server) and the simulator (tideserve.sim) route with the
same objects, so the autoscaler's evaluation sees the cache effects the product has.

Prefix affinity works on chained hashes of the prompt's leading blocks (token ids when the request carries
them, else characters), the same chaining the workers' prefix cache uses, so a shared system prompt or
conversation history hashes to the same chain on every request. The router remembers, per worker, the block
hashes it sent there (an LRU bounded per worker, by default to what the worker's KV cache holds), which
estimates what that worker has cached without asking it.

Affinity alone would pile a hot prefix onto one worker. Load bounds it the way consistent hashing with bounded
loads does (Mirrokni, Thorup and Zadimoghaddam, 2018): a worker is a candidate only while its load stays under
`load_factor` times the mean load (counting the new request); among candidates the longest cached prefix wins,
ties and misses going to the least-loaded one. A worker's load is the larger of what this router has in flight
there and what the worker itself reports running and waiting (other router replicas' requests included), and a
worker whose KV cache is nearly full is no candidate while another is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections import OrderedDict
from typing import Sequence

POLICIES = ("prefix", "least-outstanding", "round-robin")
TOKEN_BLOCK = 16  # the workers' KV block size (worker.config.EngineConfig.block_size)
CHAR_BLOCK = 64  # about 16 tokens of English text
MAX_BLOCKS = 512  # leading blocks hashed per request: bounds the router's work on 100k-token prompts
DEFAULT_BLOCKS_PER_WORKER = 8192
KV_FULL = 0.95


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
        self._blocks: dict[str, OrderedDict[bytes, None]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, worker: str, blocks: int) -> None:
        self._capacity[worker] = max(1, int(blocks))
        self._evict(worker)

    def matched(self, worker: str, hashes: Sequence[bytes]) -> int:
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

    def record(self, worker: str, hashes: Sequence[bytes]) -> None:
        blocks = self._blocks.setdefault(worker, OrderedDict())
        for h in hashes:
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
    tokens_in_flight: int = 0  # their prompt + max_tokens, as estimated at routing
    reported_requests: float = 0.0  # running + waiting, from the worker's metrics (all routers' requests)
    kv_usage: float = 0.0  # from the worker's metrics, 0..1

    @property
    def load(self) -> float:
        return max(float(self.in_flight), self.reported_requests)


@dataclasses.dataclass(frozen=True)
class Choice:
    worker: str
    reason: str  # prefix | prefix-spill | least-loaded | least-outstanding | round-robin
    matched_blocks: int = 0


class Balancer:
    def __init__(self, policy: str = "prefix", load_factor: float = 1.25, index: PrefixIndex | None = None):
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1 (1 = perfectly balanced, no affinity beyond ties)")
        self.policy = policy
        self.load_factor = load_factor
        self.index = index or PrefixIndex()
        self._turn = itertools.count()

    def choose(self, workers: Sequence[WorkerLoad], hashes: Sequence[bytes]) -> Choice | None:
        """The worker for a request whose prompt has these block hashes; None with no worker. Records the
        prefix as now held by the chosen worker (prefix policy)."""
        if not workers:
            return None
        if self.policy == "round-robin":
            return Choice(workers[next(self._turn) % len(workers)].name, "round-robin")
        if self.policy == "least-outstanding":
            return Choice(min(workers, key=_least_loaded).name, "least-outstanding")
        return self._prefix_choice(workers, hashes)

    def _prefix_choice(self, workers: Sequence[WorkerLoad], hashes: Sequence[bytes]) -> Choice:
        cap = math.ceil(self.load_factor * (sum(w.load for w in workers) + 1) / len(workers))
        roomy = [w for w in workers if w.kv_usage < KV_FULL] or list(workers)
        candidates = [w for w in roomy if w.load + 1 <= cap] or roomy
        matched = {w.name: self.index.matched(w.name, hashes) for w in workers}
        best = max(candidates, key=lambda w: (matched[w.name], -_least_loaded(w)[0], -_least_loaded(w)[1]))
        spilled = max(matched.values()) > matched[best.name]  # the worker holding more is over its bound
        if matched[best.name] == 0:
            choice = Choice(min(candidates, key=_least_loaded).name, "prefix-spill" if spilled else "least-loaded")
        else:
            choice = Choice(best.name, "prefix-spill" if spilled else "prefix", matched[best.name])
        self.index.record(choice.worker, hashes)
        return choice


def _least_loaded(w: WorkerLoad) -> tuple[float, int, str]:
    return (w.load, w.tokens_in_flight, w.name)
