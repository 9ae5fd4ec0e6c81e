"""Runs a Hugging Face causal LM over a packed batch with the engine's paged KV cache.

The model's own forward pass (embeddings, rotary, MLPs, norms) comes from transformers; only attention is
ours. We register a function under transformers' AttentionInterface: the model computes q/k/v and rotary as
usual and calls it per layer; it writes the step's new K/V into the paged pool and attends over each
sequence's blocks. All scheduled tokens of a step are packed into one row ([1, T]) with explicit
position_ids, so a decode, a prefill chunk and a prefix-cache continuation share one forward pass with no
padding. docs/engine.md records the measurements behind this choice.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tideserve.ports import free_port
from tideserve.worker import parallel, quantization
from tideserve.worker.config import EngineConfig
from tideserve.worker.quantization import KVLayer
from tideserve.worker.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

ATTENTION_NAME = "tideserve_paged"
StepSeq = tuple[list[int], int, list[int]]  # one sequence of a step: token ids computed now, first position, blocks


@dataclass
class PrefillSlice:
    """Query tokens [q_start, q_end) of one sequence attending to its first `kv_slots.numel()` cached tokens."""

    q_start: int
    q_end: int
    kv_slots: torch.Tensor  # [ctx]
    mask: torch.Tensor | None  # [q, ctx] bool, None when the chunk is the whole context (plain causal)


@dataclass
class DecodeGroup:
    """Single-token queries of sequences with similar context lengths, attended in one padded call."""

    rows: torch.Tensor  # [B] packed positions of the queries
    kv_slots: torch.Tensor  # [B, max_ctx], padded with slot 0
    mask: torch.Tensor  # [B, 1, 1, max_ctx] bool


@dataclass
class PagedBatch:
    """Step metadata computed once and shared by every layer's attention call."""

    kv_cache: list[KVLayer]  # per layer: K and V pools [num_slots, kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSlice] = field(default_factory=list)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query [1, H, T, D], key/value [1, KVH, T, D] -> ([1, T, H, D], None).
    Without a paged batch (the quantization gate's reference pass) it is the model's plain causal attention."""
    batch: PagedBatch | None = kwargs.get("paged_batch")
    if batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    layer = batch.kv_cache[module.layer_idx]
    layer.write(batch.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))  # [T, KVH, D]
    q = query[0]  # [H, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
    kv_heads = layer.k.shape[1]
    gqa = q.shape[0] != kv_heads
    for group in batch.decodes:
        # The query heads that share a KV head (heads kvh * G ... kvh * G + G - 1, as transformers' repeat_kv
        # orders them) go in as G query positions of that KV head: one [G, ctx] attention per KV head with no
        # copy of K/V per query head (SDPA's enable_gqa path repeats them; this is ~20% faster here).
        dq = q[:, group.rows].view(kv_heads, -1, len(group.rows), q.shape[2]).permute(2, 0, 1, 3)  # [B, KVH, G, D]
        dk, dv = (t.permute(0, 2, 1, 3) for t in layer.gather(group.kv_slots, q.dtype))  # [B, KVH, ctx, D]
        o = F.scaled_dot_product_attention(dq, dk, dv, attn_mask=group.mask, scale=scaling)
        out[group.rows] = o.reshape(len(group.rows), q.shape[0], q.shape[2])
    for p in batch.prefills:
        pq = q[:, p.q_start : p.q_end].unsqueeze(0)  # [1, H, q, D]
        if p.mask is None:  # the chunk is the whole context: use this step's K/V directly
            pk, pv = key[:, :, p.q_start : p.q_end], value[:, :, p.q_start : p.q_end]
        else:
            pk, pv = (t.transpose(0, 1).unsqueeze(0) for t in layer.gather(p.kv_slots, q.dtype))
        o = F.scaled_dot_product_attention(
            pq, pk, pv, attn_mask=p.mask, is_causal=p.mask is None, scale=scaling, enable_gqa=gqa
        )
        out[p.q_start : p.q_end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)


def resolve_device(device: str, rank: int = 0) -> torch.device:
    """The device of a tensor-parallel rank: rank r of a CUDA worker gets GPU r."""
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                            "cpu" if device == "auto" else device)
    if resolved.type == "cuda" and rank:
        return torch.device("cuda", (resolved.index or 0) + rank)
    return resolved


def _rank_died(why: str) -> None:
    """A tensor-parallel rank is gone: every later step would wait for it. The worker exits (readiness with
    it), and the pod's restart or the ReplicaSet replaces it."""
    log.critical("%s: the worker cannot serve without it; exiting", why)
    logging.shutdown()
    os._exit(70)


def resolve_dtype(dtype: str, device: torch.device, model_dtype: torch.dtype | None) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32  # half precision matmuls are slow or inexact on most CPUs
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _group_by_length(decodes: list, max_groups: int = 4, slack: float = 1.3) -> list[list]:
    """Split decodes into groups of similar context length: one padded attention call per group, so a few long
    contexts do not make every sequence gather and attend over their length."""
    if not decodes:
        return []
    ordered = sorted(decodes, key=lambda d: d[3])
    groups = [[ordered[0]]]
    for d in ordered[1:]:
        if d[3] > slack * groups[-1][0][3] and len(groups) < max_groups:
            groups.append([d])
        else:
            groups[-1].append(d)
    return groups


def supported_attention_window(config) -> int | None:
    """The paged attention here is full causal attention. A model whose layers attend within a sliding window is
    still served exactly while no sequence is longer than the window, so that window becomes a cap on
    max_model_len (returned); features it cannot honour are refused at load with a clear error."""
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("attention logit soft-capping (as in Gemma 2) is not supported by the paged attention")
    windowed = getattr(config, "use_sliding_window", True) and (
        getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    )
    return int(config.sliding_window) if windowed and getattr(config, "sliding_window", None) else None


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, rank: int = 0, group_port: int | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        _register_attention()
        self.rank, self.world = rank, config.tensor_parallel_size
        self.ranks: parallel.RankProcesses | None = None
        self.device = resolve_device(config.device, rank)
        self.model_dir = model_dir
        hf_config = AutoConfig.from_pretrained(model_dir)
        text_config = hf_config.get_text_config()
        self.dtype = resolve_dtype(config.dtype, self.device, getattr(text_config, "dtype", None))
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, attn_implementation=ATTENTION_NAME
        ).to(self.device)
        self.model.eval()
        self.hf_config = text_config
        self.attention_window = supported_attention_window(text_config)
        self.block_size = config.block_size
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.kv_fp8 = config.kv_cache_dtype == "fp8"
        gated = config.quantization != "none" or self.kv_fp8
        # The gate's reference: the whole unquantized model, before any sharding or quantization.
        gate_ids = self._gate_tokens() if gated and rank == 0 else []
        reference = quantization.score(self.model, gate_ids, self.device) if gate_ids else None
        if self.world > 1:
            self._join_group(config, model_dir, group_port)
        if config.quantization != "none":
            quantization.quantize_linears(self.model, config.quantization, config.dense_prefill)
        self.num_blocks = config.num_kv_blocks or self._blocks_for_memory(config.kv_cache_memory_gb)
        if self.world > 1:  # every rank's pool has rank 0's block count (the block manager's)
            box = [self.num_blocks]
            torch.distributed.broadcast_object_list(box, src=0)
            self.num_blocks = box[0]
        slots = self.num_blocks * self.block_size
        self.kv_cache = [KVLayer(slots, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.kv_fp8)
                         for _ in range(self.num_layers)]
        self.quality: quantization.Quality | None = None
        if reference is not None:
            try:
                self.quality = self._gate(config, reference, gate_ids[: slots])
            except quantization.QuantizationRefused:
                self.close()
                raise
        if self.ranks is not None:
            self.ranks.watch(_rank_died)
        log.info(
            "model %s on %s (%s, weights %s, KV cache %s, rank %d of %d): %d KV blocks of %d tokens", model_dir,
            self.device, self.dtype, config.quantization, config.kv_cache_dtype, rank, self.world, self.num_blocks,
            self.block_size,
        )

    def _join_group(self, config: EngineConfig, model_dir: Path, port: int | None) -> None:
        """Rank 0 starts the other ranks (each loads the model itself), all join the group, each keeps its
        shard; each rank runs on its share of this machine's threads."""
        if self.rank == 0:
            threads = parallel.threads_per_rank(self.world)
            port = free_port()  # the group's rendezvous, on loopback
            self.ranks = parallel.RankProcesses(self.world, port, functools.partial(rank_runner, config, model_dir),
                                                threads)
            torch.set_num_threads(threads)
        parallel.init_process_group(self.rank, self.world, port, self.device)
        self.num_kv_heads, _ = parallel.shard_model(self.model, self.hf_config, self.rank, self.world)

    @property
    def kv_bytes_per_slot(self) -> int:
        """K and V of one token in one layer, scales included."""
        return KVLayer.bytes_per_slot(self.num_kv_heads, self.head_dim, self.dtype, self.kv_fp8)

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.block_size * self.kv_bytes_per_slot

    def _gate(self, config: EngineConfig, reference: torch.Tensor, token_ids: list[int]) -> quantization.Quality:
        """The quality gate: the text's next-token logits of the unquantized weights as loaded (plain attention,
        no cache) against those the server computes now (quantized weights, the paged KV cache at its dtype): in
        16-token chunks (decode-sized matmuls, every chunk reading its context back from the cache) and, with a
        dense-prefill copy, also as one prefill (its dense path); the worse of the two is the verdict."""
        reference = reference[: len(token_ids)]
        chunks = (16, len(token_ids)) if config.dense_prefill else (16,)
        quality = min((quantization.compare(reference, self.score(token_ids, chunk), token_ids) for chunk in chunks),
                      key=lambda q: q.agreement)
        what = (f"quantization {config.quantization}{' (dense prefill)' if config.dense_prefill else ''}, "
                f"KV cache {'fp8' if self.kv_fp8 else 'auto'}")
        if quality.agreement < quantization.MIN_AGREEMENT:
            raise quantization.QuantizationRefused(
                f"{what} refused: {quality.describe()}, below the {quantization.MIN_AGREEMENT:.0%} bound of "
                "greedy-token agreement with the unquantized model")
        log.info("%s: %s", what, quality.describe())
        return quality

    def _gate_tokens(self) -> list[int]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return tokenizer(quantization.gate_text())["input_ids"][: quantization.GATE_TOKENS]

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk: int = 16) -> torch.Tensor:
        """Next-token logits at every position of one text, computed as the server computes a prompt: chunks
        through the paged KV cache (every chunk after the first reads the cached context back). Uses the pool's
        first blocks: only before serving starts."""
        from tideserve.worker.sequence import SamplingParams, Sequence

        seq = Sequence(token_ids, SamplingParams(max_tokens=1), request_id="quality-gate")
        seq.block_table = list(range(-(-len(token_ids) // self.block_size)))
        logits = []
        for start in range(0, len(token_ids), chunk):
            n = min(chunk, len(token_ids) - start)
            seq.num_computed_tokens = start
            logits.append(self.run(ScheduledBatch([seq], [n]), list(range(n))).float())
        return torch.cat(logits)

    def _blocks_for_memory(self, gigabytes: float) -> int:
        return max(1, int(gigabytes * 2**30 // self.block_bytes))

    def run(self, batch: ScheduledBatch, sample_rows: list[int]) -> torch.Tensor:
        """Forward the scheduled tokens; return logits [len(sample_rows), vocab] at the packed positions
        `sample_rows` (the last token of each sequence that completes its pending tokens this step). With
        tensor parallelism the other ranks get the same step first."""
        seqs = [(seq.token_ids[seq.num_computed_tokens: seq.num_computed_tokens + n], seq.num_computed_tokens,
                 seq.block_table) for seq, n in zip(batch.seqs, batch.num_tokens)]  # a broadcast pickles at once
        if self.world > 1:
            parallel.broadcast(parallel.StepMessage(seqs, sample_rows))
        return self._forward(seqs, sample_rows)

    def follow(self) -> None:
        """A rank above 0: run every step rank 0 broadcasts, until it says stop."""
        while (message := parallel.broadcast(None)) is not None:
            self._forward(message.seqs, [])  # only rank 0 samples

    def close(self) -> None:
        """Rank 0 of a tensor-parallel group: stop the other ranks and leave the group."""
        if self.ranks is not None:
            self.ranks.stop()
            self.ranks = None
            parallel.leave_group()

    @torch.inference_mode()
    def _forward(self, seqs: list[StepSeq], sample_rows: list[int]) -> torch.Tensor:
        input_ids, positions, paged = self._prepare(seqs)
        output = self.model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            paged_batch=paged,
        )
        return output.logits[0]

    def _prepare(self, seqs: list[StepSeq]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch]:
        bs = self.block_size
        offsets = torch.arange(bs)
        tokens, positions, slots = [], [], []
        decodes, prefills = [], []  # (packed row, block table, start, end)
        for new_tokens, start, table in seqs:
            end = start + len(new_tokens)
            row = len(tokens)
            tokens.extend(new_tokens)
            positions.extend(range(start, end))
            slots.extend(table[i // bs] * bs + i % bs for i in range(start, end))
            (decodes if end - start == 1 else prefills).append((row, table, start, end))
        dev = self.device
        paged = PagedBatch(kv_cache=self.kv_cache, slot_mapping=torch.tensor(slots, device=dev))
        for group in _group_by_length(decodes):
            # One padded block table per group -> every context slot, masked past each context length.
            width = max(len(table) for _, table, _, _ in group)
            tables = torch.tensor([table + [0] * (width - len(table)) for _, table, _, _ in group])
            kv_slots = (tables[:, :, None] * bs + offsets).view(len(group), -1)
            lengths = torch.tensor([end for _, _, _, end in group])
            mask = torch.arange(kv_slots.shape[1])[None, :] < lengths[:, None]
            paged.decodes.append(DecodeGroup(torch.tensor([row for row, _, _, _ in group], device=dev),
                                             kv_slots.to(dev), mask.view(len(group), 1, 1, -1).to(dev)))
        for row, table, start, end in prefills:
            kv_slots = (torch.tensor(table)[:, None] * bs + offsets).view(-1)[:end]
            mask = None
            if start:  # continuing a chunked or prefix-cached prompt: queries also see the cached context
                mask = (torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]).to(dev)
            paged.prefills.append(PrefillSlice(row, row + end - start, kv_slots.to(dev), mask))
        return torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), paged


def rank_runner(config: EngineConfig, model_dir: Path, rank: int, group_port: int) -> ModelRunner:
    """The runner of a tensor-parallel rank above 0 (built in its own process by worker/parallel.py)."""
    return ModelRunner(config, model_dir, rank=rank, group_port=group_port)
