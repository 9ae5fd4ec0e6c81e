"""One simulated replica running continuous batching, advanced event by event.

Every decoding sequence gains one token per engine step, so instead of stepping we keep a virtual clock V
(steps done so far): a sequence that starts decoding at V0 with n tokens to go finishes at V = V0 + n, and a heap
keyed on that threshold gives the next finish. Prompts are prefilled in FIFO chunks: each prefill step takes up to
max_num_batched_tokens - B prompt tokens, and a request whose prompt completes in a step gets its first token at
the end of that step. The step time is
    step = base + per_seq * B + per_context_token * context + per_prefill_token * P
with B decoding sequences, their total context and P prompt tokens in the current step; it changes only at
events, so between events everything moves linearly.

With a prefix cache (requests that carry prefix block ids), a replica remembers the blocks of every prompt it
has prefilled, least recently used evicted beyond what its KV cache holds, and a request admitted later prefills
only what follows its longest cached prefix (as the workers' prefix caching does; blocks of a prompt still being
prefilled are not yet there to share).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from tideserve.autoscaler.perf_model import StepTimeParams
from tideserve.router.balancer import PrefixIndex

INF = math.inf


class SimRequest:
    __slots__ = ("idx", "arrival", "input_tokens", "output_tokens", "left", "admitted", "first_token", "finished",
                 "blocks", "cached_tokens")

    def __init__(self, idx: int, arrival: float, input_tokens: int, output_tokens: int,
                 blocks: tuple | None = None):
        self.idx, self.arrival = idx, arrival
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.left = input_tokens  # prompt tokens still to prefill
        self.admitted = self.first_token = self.finished = -1.0
        self.blocks = blocks  # the prompt's prefix block ids, for the prefix cache
        self.cached_tokens = 0


class Replica:
    __slots__ = (
        "index", "name", "params", "max_num_seqs", "max_num_batched_tokens", "created", "ready_at", "draining", "v", "t", "step", "decoding", "context",
        "prefill", "backlog", "pstep_tokens", "pstep_end", "waiting", "outstanding", "version", "steps", "step_time_sum",
        "step_seq_sum", "step_token_sum", "cache", "block_tokens",
    )

    def __init__(self, index: int, params: StepTimeParams, max_num_seqs: int, max_num_batched_tokens: int,
                 created: float, ready_at: float, block_tokens: int = 0):
        # The index orders simultaneous events deterministically (an id() would differ from run to run).
        self.index, self.name, self.params = index, f"r{index}", params
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.created, self.ready_at = created, ready_at
        self.draining = False
        self.v = 0.0
        self.t = created
        self.decoding: list[tuple[float, int, SimRequest]] = []  # (finish V, idx, request)
        self.context = 0.0  # total context tokens of the decoding sequences
        self.prefill: deque[SimRequest] = deque()
        self.backlog = 0  # prompt tokens still to prefill
        self.pstep_tokens = 0  # prompt tokens in the current step
        self.pstep_end = INF
        self.waiting: deque[SimRequest] = deque()  # not admitted: max_num_seqs reached or KV full
        self.outstanding = 0  # requests routed here and not finished (the router's least-outstanding key)
        self.version = 0
        self.steps = self.step_time_sum = self.step_seq_sum = self.step_token_sum = 0.0
        self.step = params.base_s
        self.block_tokens = block_tokens  # 0: no prefix cache
        self.cache = PrefixIndex(max(1, int(params.kv_capacity_tokens // block_tokens))) if block_tokens else None

    @property
    def running(self) -> int:
        return len(self.decoding) + len(self.prefill)

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens ahead of a new request's first token: the prefill backlog and the waiting prompts."""
        return self.backlog + sum(r.input_tokens for r in self.waiting)

    @property
    def kv_usage(self) -> float:
        return min(1.0, (self.context + self.backlog) / self.params.kv_capacity_tokens)

    def _recompute_step(self) -> None:
        p = self.params
        self.step = (p.base_s + p.per_seq_s * len(self.decoding) + p.per_context_token_s * self.context
                     + p.per_prefill_token_s * self.pstep_tokens)

    def advance(self, now: float) -> None:
        """Move the clock to `now`; no event of this replica lies before it."""
        dt = now - self.t
        if dt <= 0:
            return
        self.t = now
        b = len(self.decoding)
        if not b and not self.pstep_tokens:
            return
        steps = dt / self.step
        self.v += steps
        self.context += b * steps
        self.steps += steps
        self.step_time_sum += dt
        self.step_seq_sum += b * steps
        self.step_token_sum += (b + self.pstep_tokens) * steps

    def next_event(self) -> float:
        t = self.pstep_end
        if self.decoding:
            t = min(t, self.t + (self.decoding[0][0] - self.v) * self.step)
        return t

    def admit(self, request: SimRequest, now: float) -> None:
        self.outstanding += 1
        self.waiting.append(request)
        self._admit_waiting(now)

    def _admit_waiting(self, now: float) -> None:
        cap = self.params.kv_capacity_tokens
        while self.waiting and self.running < self.max_num_seqs:
            r = self.waiting[0]
            if self.running and self.context + self.backlog + r.input_tokens > cap:
                break  # admission by free KV: wait for memory
            self.waiting.popleft()
            r.admitted = now
            if self.cache is not None and r.blocks:
                # The last prompt token is always computed (it yields the first token), as in the workers.
                r.cached_tokens = min(self.cache.matched(self.name, r.blocks) * self.block_tokens, r.input_tokens - 1)
                r.left = r.input_tokens - r.cached_tokens
            self.prefill.append(r)
            self.backlog += r.left
        if self.prefill and self.pstep_end == INF:
            self._start_prefill_step(now)
        else:
            self._recompute_step()

    def _start_prefill_step(self, now: float) -> None:
        chunk = max(1, self.max_num_batched_tokens - len(self.decoding))
        self.pstep_tokens = min(self.backlog, chunk)
        self._recompute_step()
        self.pstep_end = now + self.step

    def process(self, now: float, finished: list) -> None:
        """Complete the prefill step and the decodes due at `now`; finished requests go to `finished`."""
        if now >= self.pstep_end - 1e-12:
            budget = self.pstep_tokens
            self.backlog -= budget
            while budget and self.prefill:
                r = self.prefill[0]
                take = min(budget, r.left)
                r.left -= take
                budget -= take
                if r.left:
                    break
                self.prefill.popleft()
                r.first_token = now
                if self.cache is not None and r.blocks:
                    self.cache.record(self.name, r.blocks)
                if r.output_tokens <= 1:
                    r.finished = now
                    finished.append(r)
                    self.outstanding -= 1
                else:
                    self.context += r.input_tokens + 1
                    heapq.heappush(self.decoding, (self.v + r.output_tokens - 1, r.idx, r))
            self.pstep_tokens, self.pstep_end = 0, INF
        decoding = self.decoding
        while decoding and decoding[0][0] <= self.v + 1e-6:
            _, _, r = heapq.heappop(decoding)
            r.finished = now
            self.context -= r.input_tokens + r.output_tokens
            finished.append(r)
            self.outstanding -= 1
        if not decoding:
            self.context = 0.0
        self._admit_waiting(now)

    def set_limits(self, max_num_seqs: int, max_num_batched_tokens: int, now: float) -> None:
        """New batch limits apply from the next step; sequences beyond a lower max_num_seqs are not dropped,
        the replica just admits no more until it is below the limit."""
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self._admit_waiting(now)

    def take_step_stats(self) -> tuple[float, float, float, float]:
        stats = (self.steps, self.step_time_sum, self.step_seq_sum, self.step_token_sum)
        self.steps = self.step_time_sum = self.step_seq_sum = self.step_token_sum = 0.0
        return stats
