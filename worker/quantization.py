"""Weight quantization of a loaded model's linear layers, its FP8 KV cache, and the quality gate that refuses a
quantization that changes the model too much.

- int8: weight-only, symmetric per output channel, through torch's int8 weight-pack matmul
  (torch._weight_int8pack_mm, on CPU and CUDA). Its CPU kernel is vectorized for 16-bit activations only
  (with float32 activations it runs several times slower than the float32 matmul it replaces), so on the CPU
  activations enter it in bfloat16 and the result goes back to the model's dtype.
- int4: weight-only, asymmetric per group of 32 input columns (llama.cpp's Q4_1 layout: a scale and an offset
  per group), through torch's int4 pack matmul (tinygemm: torch._weight_int4pack_mm_for_cpu here,
  torch._weight_int4pack_mm on CUDA), activations in bfloat16 (the only dtype CUDA's kernel takes; the CPU's
  is vectorized for it). Half of int8's bytes per decode step, and faster than float32 at every batch size on
  this CPU (docs/benchmarks.md). The LM head stays at 8 bits (W8A8Linear: int8 weights and activations).
- fp8: e4m3 weights with per-channel scales, activations quantized per token on the fly, through
  torch._scaled_mm with row-wise scales (Hopper's FP8 GEMM; on this CPU the same call runs, slowly: it is
  there for the quality report and for CUDA).
- dense prefill (`dense_prefill=True`, int8 and int4): each layer also keeps its quantized weight dequantized
  once to bfloat16, and matmuls of DENSE_ROWS or more rows (prefill chunks, mixed steps) run the dense GEMM on
  that copy. On this CPU the weight-only kernels dequantize inside their loops and lose to the dense bfloat16
  GEMM from ~32 rows on (1.9x at 256: docs/benchmarks.md), while decode-sized steps stay on the quantized
  weights, where fewer bytes is what counts. The copy costs 2 bytes per weight; the values are the quantized
  model's, so prefill and decode compute the same model (the gate scores both paths).
- FP8 KV cache (KVLayer): K/V stored in e4m3 with one float32 scale per token and layer (shared by the token's
  KV heads), so the same memory holds about 4x the tokens of float32 and 2x those of bfloat16, less the scales.

The gate runs when the engine starts with a quantization or an FP8 KV cache (worker/model_runner.py): before
quantizing, the unquantized weights just loaded score a fixed text (teacher forcing: every position's
next-token logits); after, the server's own path (quantized weights, paged KV cache at its dtype) scores it
again. A configuration whose greedy-token agreement falls below MIN_AGREEMENT is refused with the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The gate's bound: share of positions whose greedy next token is unchanged. Per-channel int8 of SmolLM2 keeps
# 93-95% (docs/benchmarks.md); scales off by 2x (tests/test_quantization.py) fall below it.
MIN_AGREEMENT = 0.85
GATE_TOKENS = 256  # the gate scores the first this many tokens of the text


def absmax_scale(t: torch.Tensor, dim, top: float, keepdim: bool = False) -> torch.Tensor:
    """Symmetric scales mapping each slice's largest magnitude (over `dim`) to `top`; never zero."""
    return t.abs().amax(dim=dim, keepdim=keepdim).clamp(min=1e-12) / top


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight is stored quantized (`qweight`) with per-output-channel `scale`s."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.register_buffer("dense", None)  # the dense-prefill copy, when kept (_keep_dense)

    def _keep_dense(self, weight: torch.Tensor) -> None:
        """Keep the dense-prefill copy: the quantized weight [out, in] as the kernel dequantizes it."""
        self.register_buffer("dense", weight.to(torch.bfloat16).contiguous())

    def _dense_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The dense GEMM's result for a prefill-sized batch of rows [n, in] when this layer keeps a copy."""
        if self.dense is None or len(rows) < DENSE_ROWS:
            return None
        return F.linear(rows.to(self.dense.dtype), self.dense)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qweight={self.qweight.dtype}"

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def stored_bytes(self) -> int:
        """The packed weight and its scales: what a decode-sized step reads of this layer."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale))

    @property
    def prefill_bytes(self) -> int:
        """What a step of DENSE_ROWS or more rows reads of this layer."""
        return self.stored_bytes if self.dense is None else self.dense.numel() * self.dense.element_size()

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [out, in] and float32 scales [out] of a weight, one scale per output channel."""
    weight = weight.detach().float()
    scale = absmax_scale(weight, 1, 127.0)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(QuantizedLinear):
    def __init__(self, linear: torch.nn.Linear, dense_prefill: bool = False):
        super().__init__(linear)
        qweight, scale = _int8_per_channel(linear.weight)
        if dense_prefill:
            self._keep_dense(qweight.float() * scale[:, None])
        self.register_buffer("qweight", qweight)
        # The activations' dtype on the kernel: 16-bit (see the module's docstring).
        self.compute_dtype = torch.bfloat16 if linear.weight.dtype == torch.float32 else linear.weight.dtype
        self.register_buffer("scale", scale.to(self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = self._dense_rows(rows)
        if y is None:
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scale)
        return self._finish(x, y)


INT4_GROUP = 32  # input columns per scale and offset
# From this many rows a layer with a dense-prefill copy runs the dense bfloat16 GEMM: on this CPU, over all of
# SmolLM2's layers with cold caches, 42 against int4's 51 ms at 64 rows, 101 against 186 at 256; at 16 rows the
# int4 kernel wins (19 against 21 ms) and reads a quarter of the bytes (docs/benchmarks.md).
DENSE_ROWS = 64


class Int4Linear(QuantizedLinear):
    def __init__(self, linear: torch.nn.Linear, dense_prefill: bool = False):
        super().__init__(linear)
        n, k = self.out_features, self.in_features
        cuda = linear.weight.device.type == "cuda"
        if n % 16 or k % INT4_GROUP:
            raise ValueError(f"int4 needs in_features a multiple of {INT4_GROUP} and out_features a multiple of 16; "
                             f"this layer is {k} -> {n}")
        weight = linear.weight.detach().float().view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = weight.amin(-1), weight.amax(-1)
        # The kernel dequantizes q in 0..15 as (q - 8) * scale + zero. Scale and zero are rounded to bfloat16
        # first and the codes chosen against the rounded values, so the rounding costs no extra error.
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        codes = torch.round((weight - zero.float()[..., None]) / scale.float()[..., None] + 8)
        codes = codes.clamp(0, 15).to(torch.int32)
        if dense_prefill:
            self._keep_dense(((codes - 8) * scale.float()[..., None] + zero.float()[..., None]).view(n, k))
        codes = codes.view(n, k)
        if cuda:  # [n, k/2] bytes, the first of each pair in the high nibble; 2, 4 or 8 k-tiles of 16 columns
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8),
                                                       inner_k_tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())  # [k/32, n, 2]
        self._matmul = torch._weight_int4pack_mm if cuda else torch._weight_int4pack_mm_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = self._dense_rows(rows)
        if y is None:
            y = self._matmul(rows, self.qweight, INT4_GROUP, self.scale)
        return self._finish(x, y)


class W8A8Linear(QuantizedLinear):
    """int8 weights (per output channel) times int8 activations (per row, quantized on the fly) through torch's
    integer matmul (VNNI on this CPU: 2-3x the float32 matmul's speed at the LM head's 16 rows). Used for int4's
    LM head only: on SmolLM2's body layers per-row activation scales lose too much to outlier channels
    (greedy agreement 80%), while the head keeps 97%."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        qweight, scale = _int8_per_channel(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale[None, :].contiguous())  # [1, out], float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        x_scale = absmax_scale(rows, 1, 127.0, keepdim=True)
        codes = torch.round(rows / x_scale).to(torch.int8)
        if rows.is_cuda and len(rows) <= 16:  # CUDA's int8 GEMM takes more than 16 rows: pad, then drop
            codes = F.pad(codes, (0, 0, 0, 17 - len(rows)))
        y = torch._int_mm(codes, self.qweight.t())[: len(rows)]
        return self._finish(x, y * (x_scale * self.scale))


class Fp8Linear(QuantizedLinear):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = absmax_scale(weight, 1, FP8_MAX)
        self.register_buffer("qweight", (weight / scale[:, None]).to(FP8))
        self.register_buffer("scale", scale[None, :].contiguous())  # [1, out]: row-wise scales of _scaled_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        x_scale = absmax_scale(rows, 1, FP8_MAX, keepdim=True)
        y = torch._scaled_mm((rows / x_scale).to(FP8), self.qweight.t(), scale_a=x_scale, scale_b=self.scale,
                             out_dtype=torch.float32)
        return self._finish(x, y)


_LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}


# int4 keeps the LM head at 8 bits, as llama.cpp's 4-bit files do (SmolLM2's Q4_1 GGUF stores its tied
# embedding/head in Q8_0; its matmuls take int8 activations): in int4 the head's errors alone cost SmolLM2 12
# points of greedy agreement (82.8%, refused by the gate).
_HEADS = {"int4": W8A8Linear}


def quantize_linears(model: torch.nn.Module, mode: str, dense_prefill: bool = False) -> int:
    """Replace every nn.Linear (the LM head too: at batch 1 it is a fifth of SmolLM2's bytes) in place; returns
    how many. A head tied to the input embeddings keeps the embedding table as it was. `dense_prefill`: the body's
    layers also keep a bfloat16 copy for prefill-sized matmuls (int8 and int4; see the module's docstring); the
    head computes only the sampled rows, decode-sized, and keeps none."""
    if mode not in _LINEARS:
        raise ValueError(f"quantization must be one of {tuple(_LINEARS)}, got {mode!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # HF models have one
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                if child is head:
                    setattr(module, name, _HEADS.get(mode, _LINEARS[mode])(child))
                else:
                    cls = _LINEARS[mode]
                    setattr(module, name, cls(child, dense_prefill=True) if dense_prefill else cls(child))
                replaced += 1
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the head is its own tensor now: never re-tie it
    return replaced


# --- the KV cache -----------------------------------------------------------------------------------------


class KVLayer:
    """One layer's K and V pools, [num_slots, kv_heads, head_dim], at the cache's dtype; with FP8, stored as
    bytes (the CPU has no index_copy for float8 types) with one scale per slot."""

    def __init__(self, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 fp8: bool):
        self.fp8 = fp8
        storage = torch.uint8 if fp8 else dtype
        self.k, self.v = (torch.zeros(num_slots, kv_heads, head_dim, dtype=storage, device=device) for _ in range(2))
        self.k_scale, self.v_scale = ((torch.ones(num_slots, dtype=torch.float32, device=device) for _ in range(2))
                                      if fp8 else (None, None))

    @staticmethod
    def bytes_per_slot(kv_heads: int, head_dim: int, dtype: torch.dtype, fp8: bool) -> int:
        """K and V of one token in one layer."""
        return 2 * (kv_heads * head_dim + 4 if fp8 else kv_heads * head_dim * dtype.itemsize)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] of the tokens going to `slots`."""
        for pool, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if not self.fp8:
                pool.index_copy_(0, slots, new.to(pool.dtype))
                continue
            scale = absmax_scale(new.float(), (1, 2), FP8_MAX)
            pool.index_copy_(0, slots, (new.float() / scale[:, None, None]).to(FP8).view(torch.uint8))
            scales.index_copy_(0, slots, scale)

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape) -> [*slots.shape, kv_heads, head_dim] in `dtype`."""
        flat = slots.reshape(-1)
        out = []
        for pool, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            # index_select copies about 1.5x faster than advanced indexing on CPU.
            values = pool.index_select(0, flat)
            if self.fp8:
                values = values.view(FP8).to(dtype) * scales.index_select(0, flat).to(dtype)[:, None, None]
            out.append(values.to(dtype).view(*slots.shape, *pool.shape[1:]))
        return out[0], out[1]


# --- quality ----------------------------------------------------------------------------------------------


def gate_text() -> str:
    """The gate's and the benchmark's text: public domain (tideserve/data/text/README.md)."""
    return resources.files("tideserve").joinpath("data/text/gettysburg.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Quality:
    agreement: float  # share of positions whose greedy next token is the reference's
    max_logit_error: float
    mean_logit_error: float
    perplexity: float
    reference_perplexity: float

    def describe(self) -> str:
        return (f"greedy agreement {self.agreement:.1%}, logit error max {self.max_logit_error:.3f} mean "
                f"{self.mean_logit_error:.4f}, perplexity {self.perplexity:.2f} (unquantized "
                f"{self.reference_perplexity:.2f})")


@torch.inference_mode()
def score(model: torch.nn.Module, token_ids: list[int], device: torch.device) -> torch.Tensor:
    """Next-token logits at every position of one text, in float32 (the model's own attention: no KV cache)."""
    ids = torch.tensor([token_ids], device=device)
    return model(input_ids=ids, use_cache=False, paged_batch=None).logits[0].float()


def compare(reference: torch.Tensor, logits: torch.Tensor, token_ids: list[int]) -> Quality:
    targets = torch.tensor(token_ids[1:], device=logits.device)

    def perplexity(lg: torch.Tensor) -> float:
        return math.exp(F.cross_entropy(lg[:-1], targets).item())

    error = (logits - reference).abs()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Quality(agreement, error.max().item(), error.mean().item(), perplexity(logits), perplexity(reference))


class QuantizationRefused(ValueError):
    """The quantized model is too far from the unquantized one to be served."""
