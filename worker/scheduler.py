"""Iteration-level scheduling: which sequences run in the next forward pass, and how many tokens each.

Every step builds a batch under two limits: at most `max_num_seqs` running sequences and at most
`max_num_batched_tokens` tokens in the step. Decodes are scheduled first (one token each) so a long prompt
never stalls them; prompts fill the rest of the budget in chunks (chunked prefill). KV blocks are taken as
tokens are computed; when they run out the newest running sequence is preempted and later recomputed.

Three batching modes share this code and differ only in when waiting requests may join:
  continuous  at every step (iteration-level batching);
  dynamic     only when the running batch has finished, taking whatever is waiting;
  static      only when the running batch has finished and a full batch is waiting (or the oldest
              request has waited `batch_timeout_s`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tideserve.worker.block_manager import BlockManager
from tideserve.worker.config import EngineConfig, validate_batch_limits
from tideserve.worker.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed for each sequence in this step
    started: list[Sequence] = field(default_factory=list)  # scheduled for the first time (queue time ends)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.mode = config.batching_mode
        self.batch_timeout_s = config.batch_timeout_s
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._budget = 0
        self._scheduled: dict[Sequence, int] = {}

    def set_batch_limits(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Takes effect at the next schedule(); a lower max_num_seqs pauses the newest running sequences
        (they keep their KV blocks and resume first), it never drops them."""
        validate_batch_limits(max_num_seqs, max_num_batched_tokens)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.finished_time = time.monotonic()

    def schedule(self) -> ScheduledBatch:
        self._budget = self.max_num_batched_tokens
        self._scheduled = {}
        while len(self.running) > self.max_num_seqs:
            self._pause(self.running[-1])
        preempted_before = self.num_preemptions
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if self._budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:  # not preempted as a victim earlier in this loop
                self._schedule_running(seq)
        # No admission in a step that had to preempt: memory is short.
        if self.num_preemptions == preempted_before and self._may_admit():
            self._admit()
        now = time.monotonic()
        batch = ScheduledBatch()
        for seq, n in self._scheduled.items():
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                batch.started.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
        return batch

    def _schedule_running(self, seq: Sequence) -> None:
        if not seq.block_table:  # joined a dynamic/static batch without blocks yet
            prefix = self.blocks.match_prefix(seq)
            if prefix:
                self.blocks.adopt_prefix(seq, prefix)
        n = min(seq.num_uncomputed_tokens, self._budget)
        while self.blocks.new_blocks_needed(seq, n) > self.blocks.num_free_blocks:
            victim = self._pick_victim()
            self._preempt(victim)
            if victim is seq:
                return
        self.blocks.allocate(seq, n)
        self._take(seq, n)

    def _pick_victim(self) -> Sequence:
        # Paused sequences holding blocks go first (they are not in this step), then the newest running one.
        for seq in reversed(self.waiting):
            if seq.block_table:
                return seq
        return self.running[-1]

    def _may_admit(self) -> bool:
        if not self.waiting or self.mode == "continuous":
            return bool(self.waiting)
        if self.running:
            return False  # dynamic and static batches run to completion
        if self.mode == "static":
            full = len(self.waiting) >= self.max_num_seqs
            return full or time.monotonic() - self.waiting[0].arrival_time >= self.batch_timeout_s
        return True

    def _admit(self) -> None:
        while self.waiting and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = [] if seq.block_table else self.blocks.match_prefix(seq)
            computed = len(prefix) * self.blocks.block_size if prefix else seq.num_computed_tokens
            n = min(len(seq) - computed, self._budget)
            if self.blocks.new_blocks_needed(seq, n, prefix) > self.blocks.num_free_blocks:
                break  # admission by free blocks: wait until memory frees up
            self.waiting.popleft()
            if prefix:
                self.blocks.adopt_prefix(seq, prefix)
            self.blocks.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._take(seq, n)
        if self.mode != "continuous":
            # A dynamic or static batch is formed once: everything that fits in max_num_seqs joins now and
            # prefills over the next steps as the token budget allows.
            while self.waiting and len(self.running) < self.max_num_seqs and not self.waiting[0].block_table:
                seq = self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)

    def _take(self, seq: Sequence, n: int) -> None:
        self._scheduled[seq] = n
        self._budget -= n

    def _pause(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the sequence's KV blocks; it waits at the front of the queue and
        recomputes prompt + generated tokens when readmitted (prefix caching often makes that cheap)."""
        if seq in self._scheduled:
            self._budget += self._scheduled.pop(seq)
        if seq.status is SequenceStatus.RUNNING:
            self._pause(seq)
        self.blocks.free_sequence(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch) -> None:
        """Account for the tokens the step computed and publish newly filled blocks for prefix sharing."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.blocks.register_full_blocks(seq)
