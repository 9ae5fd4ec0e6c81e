"""Tensor parallelism over torch.distributed (gloo on this CPU): the shards, TP=2 against TP=1 on SmolLM2 and
the random tiny model, quantized TP, an idle worker keeping its ranks, and a rank that dies taking the worker
down instead of hanging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tideserve.ports import free_port
from tideserve.worker.config import EngineConfig
from tideserve.worker.engine import LLMEngine
from tideserve.worker.parallel import shard_model, split
from tideserve.worker.sequence import SamplingParams

PROMPTS = ("The history of the Roman empire begins", "def fibonacci(n):", "Once upon a time, in a small village,")


def test_shares_are_contiguous_and_as_even_as_possible():
    assert [split(3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]  # SmolLM2's 3 KV heads over 2 ranks
    assert [split(1536, 2, r) for r in range(2)] == [(0, 768), (768, 1536)]
    assert [split(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_a_rank_keeps_its_heads_and_columns(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    c = model.config  # 4 query heads in 2 KV groups of 16, MLP 128
    assert shard_model(model, c, rank=1, world=2) == (1, 2)
    layer = model.model.layers[0]
    d = c.hidden_size // c.num_attention_heads
    assert layer.self_attn.q_proj.weight.shape == (2 * d, c.hidden_size)
    assert layer.self_attn.k_proj.weight.shape == (d, c.hidden_size)
    assert layer.self_attn.o_proj.inner.weight.shape == (c.hidden_size, 2 * d)
    assert layer.mlp.down_proj.inner.weight.shape == (c.hidden_size, c.intermediate_size // 2)
    with pytest.raises(ValueError, match="exceeds the model's 2 KV heads"):
        shard_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), c, rank=0, world=3)


def greedy(model: str, tp: int, **config) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=model, dtype="float32", tensor_parallel_size=tp, max_model_len=512,
                                    num_kv_blocks=128, **config))
    try:
        outputs: dict[str, list[int]] = {}
        for i, prompt in enumerate(PROMPTS):
            engine.submit(str(i), engine.tokenizer(prompt)["input_ids"],
                          SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        while engine.has_work():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.token_ids)
        return [outputs[str(i)] for i in range(len(PROMPTS))]
    finally:
        engine.close()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for p, q in zip(a, b) for x, y in zip(p, q)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_tp2_is_token_identical_to_tp1_on_smollm2_in_float32():
    assert greedy("smollm2", 2) == greedy("smollm2", 1)


def test_tp2_agrees_with_tp1_on_the_random_tiny_model(tiny_model_dir):
    # Its near-flat logits make every reordered float sum a chance to flip a token: 99% is the bound.
    assert agreement(greedy(tiny_model_dir, 2), greedy(tiny_model_dir, 1)) >= 0.99


def test_tp2_with_int8_weights_passes_the_gate_through_the_sharded_path():
    engine = LLMEngine(EngineConfig(model="smollm2", dtype="float32", tensor_parallel_size=2, quantization="int8",
                                    max_model_len=512, num_kv_blocks=64))
    try:
        assert engine.runner.quality.agreement >= 0.9
    finally:
        engine.close()


def _children(pid: int) -> list[int]:
    """Child processes of every thread of `pid` (the ranks are started from the engine's thread)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="Linux /proc")
def test_a_rank_that_dies_takes_the_worker_down_instead_of_hanging_it(tiny_model_dir):
    port = free_port()
    # A short collective timeout: the worker idles past it below, which must not cost it its rank.
    server = subprocess.Popen([sys.executable, "-m", "tideserve", "serve", "--model", tiny_model_dir,
                               "--tensor-parallel-size", "2", "--port", str(port), "--admin-port", str(free_port()),
                               "--max-model-len", "256", "--num-kv-blocks", "64", "--dtype", "float32"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TIDESERVE_TP_COLLECTIVE_TIMEOUT_S": "5"})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.5)
        else:
            pytest.fail("the tensor-parallel worker never became ready")
        for _ in range(2):  # idle for longer than the collective timeout, then serve
            time.sleep(6)
            response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                  json={"model": "tiny-v1", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert server.poll() is None
        (rank1,) = _children(server.pid)
        os.kill(rank1, signal.SIGKILL)
        code = server.wait(timeout=60)  # never hangs
        assert code != 0
        assert "tensor-parallel rank 1" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
