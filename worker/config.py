"""Engine configuration: one dataclass, validated once, shared by the scheduler, runner and server."""

from __future__ import annotations

from dataclasses import dataclass, field

BATCHING_MODES = ("continuous", "dynamic", "static")
QUANTIZATIONS = ("none", "int8", "int4", "fp8")  # of the linear layers' weights (worker/quantization.py)
KV_CACHE_DTYPES = ("auto", "fp8")
DENSE_PREFILL_QUANTIZATIONS = ("int8", "int4")  # weight-only kernels whose prefill the dense GEMM beats on CPU


@dataclass
class EngineConfig:
    model: str
    served_model_name: str | None = None
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    quantization: str = "none"  # none | int8 | int4 | fp8: the linear layers' weights (worker/quantization.py)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (e4m3 with per-token scales)
    # int8/int4 also keep a bfloat16 copy of the weights for prefill-sized matmuls (worker/quantization.py).
    dense_prefill: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensor_parallel_size: int = 1  # ranks (processes) the model is sharded over (worker/parallel.py)
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 8192
    # Batch limits: both can be changed while serving (see LLMEngine.set_batch_limits).
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # KV pool size in blocks; default: sized from kv_cache_memory_gb.
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    enable_prefix_caching: bool = True
    batching_mode: str = "continuous"
    # static mode waits this long for a full batch before it runs a partial one.
    batch_timeout_s: float = 1.0
    # Bound on the waiting queue; beyond it requests are refused (HTTP 429).
    max_waiting_requests: int = 256
    # The device's peaks for MBU/MFU (worker/utilization.py); None: measured when the engine starts.
    peak_bandwidth_gbps: float | None = None
    peak_tflops: float | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batching_mode not in BATCHING_MODES:
            raise ValueError(f"batching_mode must be one of {BATCHING_MODES}, got {self.batching_mode!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dense_prefill and self.quantization not in DENSE_PREFILL_QUANTIZATIONS:
            raise ValueError(f"dense_prefill needs quantization {' or '.join(DENSE_PREFILL_QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be >= 1")
        for name in ("peak_bandwidth_gbps", "peak_tflops"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        validate_batch_limits(self.max_num_seqs, self.max_num_batched_tokens)


def validate_batch_limits(max_num_seqs: int, max_num_batched_tokens: int) -> None:
    """Raise ValueError unless the pair of limits is usable; every decode needs one token of the step budget."""
    if not isinstance(max_num_seqs, int) or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
    if (
        not isinstance(max_num_batched_tokens, int)
        or isinstance(max_num_batched_tokens, bool)
        or max_num_batched_tokens < 1
    ):
        raise ValueError(f"max_num_batched_tokens must be an integer >= 1, got {max_num_batched_tokens!r}")
    if max_num_batched_tokens < max_num_seqs:
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs}): "
            "every running sequence needs one token of the per-step budget"
        )
