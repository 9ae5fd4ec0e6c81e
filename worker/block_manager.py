"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, and prefix caching of full blocks.

A sequence owns a block table (logical block i -> physical block id). Blocks are allocated as tokens are
computed, never reserved up front for max_tokens. A full block is registered under a hash of its tokens
chained with the previous block's hash, so a later request with the same prefix maps the same physical block
instead of recomputing it. Freed blocks stay hashed while they sit in the free list (an LRU), so a prefix
survives its first owner until the memory is needed again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tideserve.worker.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((previous, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front is reused first.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        # Per sequence: the chain hashes of its full blocks that have been registered (or looked up).
        self._seq_hashes: dict[int, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by live sequences (cached but free blocks count as free, as in vLLM)."""
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix caching -------------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding a prefix of `seq`. The last token is always left to compute, so
        the forward pass has a position to sample from and never writes into a shared block."""
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        previous = None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            previous = chain_hash(previous, tokens)
            block_id = self.cached.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tokens:  # a hash collision is a miss
                break
            matched.append(block_id)
        return matched

    def new_blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> int:
        """Free blocks that scheduling `num_new_tokens` more tokens takes, counting cached free prefix blocks."""
        if prefix:  # a sequence being admitted that will adopt `prefix`
            have, computed = len(prefix), len(prefix) * self.block_size
        else:
            have, computed = len(seq.block_table), seq.num_computed_tokens
        revived = sum(1 for b in prefix if self.blocks[b].ref_count == 0)  # cached blocks now in the free list
        return max(0, self.blocks_for(computed + num_new_tokens) - have) + revived

    def adopt_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block_id in prefix:
            self._ref(block_id)
        seq.block_table = list(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self._seq_hashes[seq.seq_id] = [self.blocks[b].hash for b in prefix]

    # --- allocation -----------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to hold num_computed_tokens + num_new_tokens tokens."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > len(self.free):
            raise RuntimeError(f"KV cache exhausted: need {needed} blocks, {len(self.free)} free")
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]  # evicting a cached prefix block
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step, publish the blocks that the step filled so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id

    def free_sequence(self, seq: Sequence) -> None:
        # Tail blocks are released first so they are also evicted first: prefixes live longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing worth keeping: reuse it before any cached block
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_hashes.pop(seq.seq_id, None)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
