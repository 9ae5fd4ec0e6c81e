"""MBU and MFU: one decode step of the tiny Llama counted by hand from its configuration, the step kinds, the
peak probe, and the histograms the engine exports."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client import generate_latest

from tideserve.autoscaler.scrape import parse_exposition
from tideserve.worker.config import EngineConfig
from tideserve.worker.engine import LLMEngine
from tideserve.worker.sequence import SamplingParams
from tideserve.worker.utilization import DevicePeak, ModelFootprint, step_kind


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=tiny_model_dir, served_model_name="tiny", max_model_len=256,
                                  num_kv_blocks=64, peak_bandwidth_gbps=10.0, peak_tflops=0.5))


def test_one_decode_step_moves_the_weights_and_the_context_kv_computed_by_hand(engine):
    c = engine.runner.hf_config
    h, layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, h // c.num_attention_heads
    # Llama, fp32, untied head: q, k, v, o projections, gate/up/down, two RMSNorms per layer, a final norm, and
    # the LM head; the input embedding is read only for the looked-up rows.
    body = layers * (h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter + 2 * h) + h
    weight_bytes = 4 * (body + vocab * h)
    kv_per_token = 2 * layers * kv_heads * d * 4
    footprint = engine.footprint
    assert (footprint.weight_bytes, footprint.body_params, footprint.head_params) == (weight_bytes, body, vocab * h)
    assert footprint.kv_bytes_per_token == kv_per_token
    # One sequence with 99 cached tokens decodes its 100th: the weights, 99 tokens of K/V read, one written.
    moved, flops = footprint.step_cost([(99, 1)], sampled_rows=1)
    assert moved == weight_bytes + 100 * kv_per_token
    assert flops == 2 * body + 2 * vocab * h + 4 * layers * heads * d * 100
    # A step of 10 ms on a 10 GB/s device: MBU is those bytes over 0.1 GB.
    assert moved / 0.010 / engine.peak.bytes_per_s == pytest.approx((weight_bytes + 100 * kv_per_token) / 1e8)


def test_a_prefill_chunk_counts_its_causal_pairs_and_the_head_only_for_sampled_rows(engine):
    f = engine.footprint
    # A 16-token chunk after 32 cached: query i sees 32 + i + 1 keys.
    _, flops = f.step_cost([(32, 16)], sampled_rows=0)
    assert flops == 2 * f.body_params * 16 + f.attention_flops_per_pair * sum(32 + i + 1 for i in range(16))


def test_step_kinds():
    assert step_kind([1, 1, 1]) == "decode"
    assert step_kind([64, 12]) == "prefill"
    assert step_kind([1, 64]) == "mixed"


def test_the_peak_probe_measures_something_plausible():
    peak = DevicePeak.measure(torch.device("cpu"), torch.float32, copy_mib=16, matmul_n=256)
    assert peak.measured and 1e8 < peak.bytes_per_s < 1e13 and 1e7 < peak.flops_per_s < 1e15


def test_the_engine_exports_mbu_and_mfu_per_step_kind(engine):
    engine.submit("r1", list(range(5, 45)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    text = generate_latest(engine.metrics.registry).decode()
    snapshot = parse_exposition(text)
    assert 'tideserve_mbu_count{kind="prefill",model_name="tiny"} 1.0' in text
    assert 'tideserve_mbu_count{kind="decode",model_name="tiny"} 5.0' in text
    assert snapshot.histograms["tideserve_mbu"].count == snapshot.histograms["tideserve_mfu"].count == 6
    assert snapshot.value("tideserve_device_peak_bytes_per_second") == 10e9
    assert snapshot.value("tideserve_device_peak_flops") == 0.5e12
    assert 0 < snapshot.histograms["tideserve_mbu"].mean < 1.5


def test_bad_peaks_are_refused():
    with pytest.raises(ValueError, match="peak_bandwidth_gbps must be > 0"):
        EngineConfig(model="tiny", peak_bandwidth_gbps=0)


def test_a_tied_lm_head_is_read_once():
    emb = torch.nn.Embedding(100, 8)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.lin = emb, torch.nn.Linear(8, 8, bias=False)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.embed  # the head is the embedding table

    f = ModelFootprint.of(Tied(), num_layers=1, num_heads=2, kv_bytes_per_slot=2 * 1 * 4 * 4, head_dim=4)
    assert f.weight_bytes == 4 * (100 * 8 + 64) and f.head_params == 800 and f.body_params == 64


def test_tideserve_bench_reports_the_servers_mbu_over_its_run(tiny_model_dir):
    """`tideserve bench` reads tideserve_mbu/tideserve_mfu from the server before and after its run: the means
    over the run's decode and prefill steps, as the worker's own histograms give them."""
    import asyncio

    from conftest import run_worker
    from tideserve.bench.loadgen import BenchConfig, format_summary, run_benchmark
    from tideserve.traces import TraceRequest

    with run_worker(tiny_model_dir) as worker:
        assert "tideserve_mbu_count" not in httpx.get(f"{worker.url}/metrics").text  # no step has run yet
        result = asyncio.run(run_benchmark(BenchConfig(
            base_url=worker.url, model="tiny", progress=False,
            workload=[TraceRequest(i * 0.05, 24, 8) for i in range(12)])))
        exposition = parse_exposition(httpx.get(f"{worker.url}/metrics").text)
    s = result.summary
    assert s.failed == 0
    assert s.server_mbu_decode is not None and 0 < s.server_mbu_decode < 1.5
    assert s.server_mfu_prefill is not None and 0 < s.server_mfu_prefill < 1.5
    # The run was every step the worker took: the decode mean lies within the range of all steps' MBU.
    mbu = exposition.histograms["tideserve_mbu"]
    assert mbu.quantile(0.0) <= s.server_mbu_decode <= mbu.quantile(1.0) * 1.5
    assert "Server MBU, decode steps (mean)" in format_summary(result)


def test_the_window_carries_the_mean_mbu_of_its_steps_and_the_local_view_shows_it():
    from tideserve.autoscaler.scrape import ReplicaSample, WindowAggregator
    from tideserve.local.runtime import TimelinePoint
    from tideserve.local.view import HEADER, format_row
    from tideserve.worker.metrics import EngineMetrics

    m = EngineMetrics("m")
    m.step_utilization("decode", 0.9, 0.01)  # before the window: not in it
    aggregator = WindowAggregator()
    common = dict(desired_replicas=1, pending_replicas=0, max_num_seqs=8, max_num_batched_tokens=64)

    def sample(t):
        return [ReplicaSample("a", t, True, 0.0, parse_exposition(generate_latest(m.registry).decode()))]

    aggregator.observe(100.0, sample(100.0), **common)
    for _ in range(3):
        m.step_utilization("decode", 0.2, 0.01)
    m.step_utilization("prefill", 0.5, 0.4)
    obs = aggregator.observe(115.0, sample(115.0), **common)
    assert obs.mbu == pytest.approx((3 * 0.2 + 0.5) / 4)
    point = TimelinePoint(115.0, 1, 1, 8, 64, 0.1, 0.02, 1.0, 0.0, 1.0, 2.0, "hold", "", False, obs.mbu)
    assert "MBU" in HEADER and " 27.5% " in format_row(point, 100.0)
