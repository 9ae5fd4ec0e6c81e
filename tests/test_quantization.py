"""Weight quantization (int8, int4, fp8), the FP8 KV cache and the quality gate, on real kernels: the layers against
float matmuls, the cache's capacity and round trip, the gate serving SmolLM2 in int8 and int4 and refusing a broken
quantization, the step's bytes at the stored dtypes, and the flags from `tideserve serve` to the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tideserve.worker import quantization
from tideserve.worker.config import EngineConfig
from tideserve.worker.engine import LLMEngine
from tideserve.worker.quantization import (DENSE_ROWS, INT4_GROUP, Fp8Linear, Int4Linear, Int8Linear, KVLayer,
                                          QuantizationRefused, QuantizedLinear, W8A8Linear)
from tideserve.worker.sequence import SamplingParams


def linear(out_features=96, in_features=64, bias=True):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    return layer


@pytest.mark.parametrize("cls,bound,stored_bytes", [
    (Int8Linear, 0.01, 96 * 64 + 96 * 2),  # a byte per weight, a bfloat16 scale per channel
    (Int4Linear, 0.12, 96 * 64 // 2 + 96 * 2 * 2 * 2),  # half a byte, a bfloat16 scale and zero per 32 columns
    (W8A8Linear, 0.02, 96 * 64 + 96 * 4),  # a byte per weight, a float32 scale per channel
    (Fp8Linear, 0.08, 96 * 64 + 96 * 4),
])
def test_a_quantized_linear_matches_the_float_one_within_its_precision(cls, bound, stored_bytes):
    layer = linear()
    x = torch.randn(5, 3, 64)
    exact = layer(x)
    q = cls(layer)
    y = q(x)
    assert y.shape == exact.shape and y.dtype == exact.dtype
    assert ((y - exact).norm() / exact.norm()).item() < bound
    assert q.stored_bytes == stored_bytes and q.weight_params == 96 * 64


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_a_dense_prefill_copy_computes_the_quantized_layer_for_prefill_sized_batches(cls):
    layer = linear()
    plain, dense = cls(layer), cls(layer, dense_prefill=True)
    assert plain.dense is None and dense.dense.dtype == torch.bfloat16
    assert dense.stored_bytes == plain.stored_bytes and dense.prefill_bytes == 96 * 64 * 2
    for rows in (DENSE_ROWS - 1, DENSE_ROWS):  # the kernel below the threshold, the copy from it on
        x = torch.randn(rows, 64)
        kernel, got = plain(x), dense(x)
        assert ((got - kernel).norm() / kernel.norm()).item() < 0.01  # the same quantized weights
        assert torch.equal(got, kernel) == (rows < DENSE_ROWS)


@pytest.mark.parametrize("rows", [7, DENSE_ROWS + 5])  # the int4 kernel; the dense-prefill copy
def test_int4_reproduces_weights_that_are_4_bit_per_group_exactly(rows):
    # Weights that are (q - 8) * scale + zero per group of 32 columns, scale and zero bfloat16 values, as a
    # dequantized Q4_1 checkpoint's are: only the activations' bfloat16 rounding may differ, so a wrong nibble
    # order, group layout or zero convention shows as a large error, on either path.
    torch.manual_seed(1)
    out_features, in_features = 48, 96
    codes = torch.randint(0, 16, (out_features, in_features // INT4_GROUP, INT4_GROUP))
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its whole range, as a min/max quantizer's does
    scale = (torch.rand(out_features, in_features // INT4_GROUP, 1) * 0.01 + 0.001).to(torch.bfloat16).float()
    zero = (torch.randn(out_features, in_features // INT4_GROUP, 1) * 0.05).to(torch.bfloat16).float()
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    layer.weight.data = ((codes - 8) * scale + zero).reshape(out_features, in_features)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    exact = x.float() @ layer.weight.t()
    int4 = Int4Linear(layer, dense_prefill=True)
    got = int4(x.float())
    assert ((got - exact).norm() / exact.norm()).item() < 0.01
    assert torch.allclose(int4.dense.float(), layer.weight, rtol=2**-8, atol=0)  # bfloat16 rounding only


def test_int4_names_a_layer_whose_shape_its_kernel_cannot_take():
    with pytest.raises(ValueError, match="int4 needs in_features a multiple of 32.*80 -> 96"):
        Int4Linear(linear(96, 80))


def test_int8_refuses_nothing_silently_and_replaces_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 4)))
    model.config = type("C", (), {"tie_word_embeddings": True})()
    assert quantization.quantize_linears(model, "int8") == 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules()) and not model.config.tie_word_embeddings
    with pytest.raises(ValueError, match="int8"):
        quantization.quantize_linears(model, "nf4")


def test_the_fp8_kv_cache_round_trips_within_e4m3_and_holds_about_four_times_the_fp32_tokens():
    # SmolLM2's KV shape: 3 KV heads of 64.
    assert KVLayer.bytes_per_slot(3, 64, torch.float32, fp8=False) / KVLayer.bytes_per_slot(3, 64, torch.float32, True) >= 3.9
    assert KVLayer.bytes_per_slot(3, 64, torch.bfloat16, False) / KVLayer.bytes_per_slot(3, 64, torch.bfloat16, True) >= 1.9
    layer = KVLayer(32, 3, 64, torch.float32, torch.device("cpu"), fp8=True)
    k, v = torch.randn(4, 3, 64) * 5, torch.randn(4, 3, 64) * 0.01  # per-token scales: any magnitude
    slots = torch.tensor([7, 1, 30, 2])
    layer.write(slots, k, v)
    got_k, got_v = layer.gather(slots.view(2, 2), torch.float32)
    assert got_k.shape == (2, 2, 3, 64)
    for got, want in ((got_k.view(4, 3, 64), k), (got_v.view(4, 3, 64), v)):
        assert ((got - want).abs() <= 0.07 * want.abs().amax(dim=(1, 2), keepdim=True)).all()


def _greedy_tokens(engine: LLMEngine, prompt: str, max_tokens: int) -> list[int]:
    engine.submit("a", engine.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    tokens = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
    return tokens


def test_the_engine_serves_smollm2_in_int8_with_the_gates_report_and_counts_its_bytes():
    engine = LLMEngine(EngineConfig(model="smollm2", dtype="float32", quantization="int8", num_kv_blocks=64, max_model_len=512))
    quality = engine.runner.quality
    assert quality.agreement >= 0.9 and abs(quality.perplexity / quality.reference_perplexity - 1) < 0.05
    # Every linear weight is read at one byte a step, plus its bfloat16 scales; the tied embedding table only
    # by the rows looked up.
    stored = [m for m in engine.runner.model.modules() if isinstance(m, Int8Linear)]
    norms = sum(p.numel() * 4 for n, p in engine.runner.model.named_parameters() if "norm" in n)
    assert engine.footprint.weight_bytes == sum(m.qweight.numel() + 2 * m.scale.numel() for m in stored) + norms
    assert len(_greedy_tokens(engine, "The capital of France is", 8)) == 8


def test_the_engine_serves_smollm2_in_int4_with_the_head_at_8_bits():
    engine = LLMEngine(EngineConfig(model="smollm2", dtype="float32", quantization="int4", num_kv_blocks=64,
                                    max_model_len=512))
    quality = engine.runner.quality
    assert quality.agreement >= 0.9 and abs(quality.perplexity / quality.reference_perplexity - 1) < 0.05
    model = engine.runner.model
    assert isinstance(model.get_output_embeddings(), W8A8Linear)
    body = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(body) == 7 * model.config.num_hidden_layers
    head = model.get_output_embeddings()
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert engine.footprint.weight_bytes == sum(m.stored_bytes for m in body) + head.stored_bytes + norms
    assert engine.footprint.body_params == sum(m.weight_params for m in body) + norms // 4
    assert len(_greedy_tokens(engine, "The capital of France is", 8)) == 8


def test_with_dense_prefill_a_prefill_step_reads_the_bfloat16_copies_and_a_decode_step_the_int4_weights():
    engine = LLMEngine(EngineConfig(model="smollm2", dtype="float32", quantization="int4", dense_prefill=True,
                                    num_kv_blocks=64, max_model_len=512))
    assert engine.runner.quality.agreement >= 0.9
    model = engine.runner.model
    body = [m for m in model.modules() if isinstance(m, Int4Linear)]
    head = model.get_output_embeddings()
    assert all(m.dense is not None for m in body) and head.dense is None  # the head computes sampled rows only
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    fp = engine.footprint
    assert fp.weight_bytes == sum(m.stored_bytes for m in body) + head.stored_bytes + norms
    assert fp.prefill_weight_bytes == sum(2 * m.weight_params for m in body) + head.stored_bytes + norms
    kv = fp.kv_bytes_per_token
    decodes = DENSE_ROWS - 1  # sequences of 100 cached tokens, one new each
    assert fp.step_cost([(100, 1)] * decodes, decodes)[0] == fp.weight_bytes + decodes * 101 * kv
    assert fp.step_cost([(0, DENSE_ROWS)], 1)[0] == fp.prefill_weight_bytes + DENSE_ROWS * kv
    prompt = " ".join(["four score and seven years ago"] * 16)  # a prefill of more than DENSE_ROWS tokens
    assert len(_greedy_tokens(engine, prompt, 8)) == 8


def test_the_gate_scores_the_dense_prefill_path_too(monkeypatch):
    real = QuantizedLinear._keep_dense
    monkeypatch.setattr(QuantizedLinear, "_keep_dense", lambda self, weight: real(self, 2 * weight))  # a bad copy
    with pytest.raises(QuantizationRefused, match=r"int4 \(dense prefill\), KV cache auto refused: greedy agreement"):
        LLMEngine(EngineConfig(model="smollm2", dtype="float32", quantization="int4", dense_prefill=True,
                               num_kv_blocks=64, max_model_len=512))


def test_an_fp8_kv_cache_holds_four_times_the_tokens_in_the_same_memory():
    plain = LLMEngine(EngineConfig(model="smollm2", dtype="float32", kv_cache_memory_gb=0.25, max_model_len=1024))
    fp8 = LLMEngine(EngineConfig(model="smollm2", dtype="float32", kv_cache_memory_gb=0.25, kv_cache_dtype="fp8",
                                    max_model_len=1024))
    assert fp8.runner.num_blocks >= 3.9 * plain.runner.num_blocks
    assert fp8.metrics.kv_capacity_tokens._value.get() == fp8.runner.num_blocks * 16
    assert fp8.runner.quality.agreement >= 0.9


def test_the_gate_refuses_a_quantization_that_changes_the_model(monkeypatch):
    real = Int8Linear.__init__

    def broken(self, layer):  # every channel's scale off by 2x: a kernel that misreads its layout
        real(self, layer)
        self.scale.mul_(2)

    monkeypatch.setattr(Int8Linear, "__init__", broken)
    with pytest.raises(QuantizationRefused, match="greedy agreement .* below the 85% bound"):
        LLMEngine(EngineConfig(model="smollm2", dtype="float32", quantization="int8", num_kv_blocks=64, max_model_len=512))


def test_serve_takes_the_flags_and_refuses_bad_values():
    from tideserve.worker.server import add_arguments, engine_config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["--model", "tiny", "--quantization", "int8",
                                                        "--kv-cache-dtype", "fp8"]))
    assert (config.quantization, config.kv_cache_dtype, config.dense_prefill) == ("int8", "fp8", False)
    config = engine_config_from_args(parser.parse_args(["--model", "tiny", "--quantization", "int4",
                                                        "--dense-prefill"]))
    assert (config.quantization, config.dense_prefill) == ("int4", True)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model="tiny", quantization="nf4")
    for quantization_ in ("none", "fp8"):
        with pytest.raises(ValueError, match="dense_prefill needs quantization int8 or int4"):
            EngineConfig(model="tiny", quantization=quantization_, dense_prefill=True)
    result = subprocess.run([sys.executable, "-m", "tideserve", "serve", "--model", "tiny", "--kv-cache-dtype", "int4"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--kv-cache-dtype" in result.stderr
