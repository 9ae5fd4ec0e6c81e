"""Model bandwidth and FLOP utilization (MBU, MFU) of every engine step.

Decode is bound by the bytes a step moves, not by its FLOPs: each step reads every weight once whatever the
batch, plus the K/V of every sequence's context. MBU = those bytes / step time / the device's peak bandwidth;
MFU = the step's FLOPs / step time / its peak FLOP/s (what bounds prefill). The peaks are measured when the
engine starts (a large tensor copy, a large matmul) unless given.

What a step is counted to read and compute:
- bytes: every weight at its stored dtype (a step of quantization.DENSE_ROWS or more tokens reads the layers'
  dense-prefill copies instead, where they are kept) except the input embedding table (a step reads only the
  rows it looks up; when the LM head shares that table, the head reads it whole, and it is counted once), the
  K/V of each sequence's context (the tokens before this step's) and the K/V this step writes;
- FLOPs: 2 per weight of the transformer body per token computed, 2 per LM-head weight per sampled row, and
  attention's 4 x heads x head_dim per (query, key) pair of the causal chunk (QK^T and AV).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tideserve.worker.quantization import DENSE_ROWS

STEP_KINDS = ("decode", "prefill", "mixed")


@dataclass(frozen=True)
class ModelFootprint:
    weight_bytes: int  # read by every step (of fewer than quantization.DENSE_ROWS tokens)
    prefill_weight_bytes: int  # read by a step of DENSE_ROWS or more tokens (dense-prefill copies instead)
    body_params: int  # weights of the transformer layers (2 FLOPs each per token computed)
    head_params: int  # weights of the LM head (2 FLOPs each per sampled row)
    kv_bytes_per_token: int  # K and V of one token over all layers, at the cache's dtype (FP8: with scales)
    attention_flops_per_pair: int  # per (query token, context token): QK^T and AV over all layers

    @classmethod
    def of(cls, model: torch.nn.Module, num_layers: int, num_heads: int, kv_bytes_per_slot: int,
           head_dim: int) -> "ModelFootprint":
        """kv_bytes_per_slot: K and V of one token in one layer, at the cache's dtype (with its scales)."""
        from tideserve.worker.quantization import QuantizedLinear

        embedding = model.get_input_embeddings().weight
        head_module = model.get_output_embeddings()
        quantized = isinstance(head_module, QuantizedLinear)
        head = head_module.qweight if quantized else head_module.weight
        params = {id(p): p for p in model.parameters()}  # a tied head is one tensor
        # Quantized layers hold their weights and scales as buffers, at their stored dtype.
        stored = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
        if head is not embedding:
            weight_bytes -= embedding.numel() * embedding.element_size()
        prefill_weight_bytes = weight_bytes + sum(m.prefill_bytes for m in stored)
        weight_bytes += sum(m.stored_bytes for m in stored)
        body = sum(p.numel() for p in params.values() if p is not embedding and p is not head)
        body += sum(m.weight_params for m in stored if m is not head_module)
        head_params = head_module.weight_params if quantized else head.numel()
        return cls(weight_bytes=weight_bytes, prefill_weight_bytes=prefill_weight_bytes, body_params=body,
                   head_params=head_params, kv_bytes_per_token=num_layers * kv_bytes_per_slot,
                   attention_flops_per_pair=4 * num_layers * num_heads * head_dim)

    def step_cost(self, chunks: list[tuple[int, int]], sampled_rows: int) -> tuple[int, int]:
        """(bytes, FLOPs) of a step that computes, per sequence, `n` new tokens after `start` cached ones."""
        context = sum(start for start, _ in chunks)
        new = sum(n for _, n in chunks)
        weights = self.prefill_weight_bytes if new >= DENSE_ROWS else self.weight_bytes
        moved = weights + (context + new) * self.kv_bytes_per_token
        # Query i of a chunk (0-based) attends to start + i + 1 keys.
        pairs = sum(n * start + n * (n + 1) // 2 for start, n in chunks)
        flops = 2 * self.body_params * new + 2 * self.head_params * sampled_rows + self.attention_flops_per_pair * pairs
        return moved, flops


def step_kind(num_tokens: list[int]) -> str:
    decodes = sum(1 for n in num_tokens if n == 1)
    return "decode" if decodes == len(num_tokens) else "prefill" if not decodes else "mixed"


@dataclass(frozen=True)
class DevicePeak:
    bytes_per_s: float
    flops_per_s: float
    measured: bool  # False: given by the operator of the worker

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype, copy_mib: int = 64, matmul_n: int = 1024,
                repeats: int = 3) -> "DevicePeak":
        """Best of a few runs of a copy too large for caches (it reads and writes every byte) and of a square
        matmul in the model's dtype."""

        def best(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
            return max(min(times), 1e-9)

        src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        copy_s = best(lambda: dst.copy_(src))
        a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
        b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
        matmul_s = best(lambda: a @ b)
        return cls(2 * src.numel() * 4 / copy_s, 2 * matmul_n**3 / matmul_s, True)
