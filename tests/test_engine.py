"""Engine correctness: greedy outputs match transformers' generate under every scheduling path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tideserve.worker.block_manager import BlockManager
from tideserve.worker.config import EngineConfig
from tideserve.worker.engine import LLMEngine, PromptTooLongError, QueueFullError
from tideserve.worker.sampler import Sampler
from tideserve.worker.sequence import SamplingParams, Sequence


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_engine(model_dir, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_model_len", 256)
    kwargs.setdefault("num_kv_blocks", 128)
    return LLMEngine(EngineConfig(model=model_dir, **kwargs))


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def mixed_prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice([1, 3, 9, 17, 40, 70]))] for _ in range(count)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(), id="roomy"),
        # 16 tokens per step forces chunked prefill of the longer prompts next to running decodes;
        # 24 blocks of 4 tokens cannot hold all sequences at once, forcing preemption by recompute.
        pytest.param(dict(max_num_batched_tokens=16, max_num_seqs=8, block_size=4, num_kv_blocks=24, max_model_len=96),
                     id="chunked+preempt"),
        pytest.param(dict(batching_mode="static", max_num_seqs=4, batch_timeout_s=0.0), id="static"),
        pytest.param(dict(batching_mode="dynamic", max_num_seqs=3), id="dynamic"),
    ],
)
def test_greedy_matches_generate(tiny_model_dir, reference, config):
    engine = make_engine(tiny_model_dir, **config)
    prompts = mixed_prompts(len(engine.tokenizer), 10)
    for i, p in enumerate(prompts):
        engine.submit(str(i), p, GREEDY)
    outputs = run_to_completion(engine)
    for i, p in enumerate(prompts):
        assert tokens_of(outputs[str(i)]) == reference_greedy(reference, p, 12), f"prompt {i}"
    if config.get("num_kv_blocks") == 24:
        assert engine.scheduler.num_preemptions > 0
        assert engine.metrics.step_tokens._sum.get() > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_sharing_reuses_blocks_and_matches_generate(tiny_model_dir, reference):
    engine = make_engine(tiny_model_dir, block_size=4)
    rng = random.Random(1)
    shared = [rng.randrange(3, len(engine.tokenizer)) for _ in range(21)]
    first, second = shared + [7, 8], shared + [9, 10, 11]
    engine.submit("a", first, GREEDY)
    run_to_completion(engine)
    engine.submit("b", second, GREEDY)
    engine.submit("c", first, GREEDY)  # identical prompt: everything but its last token is cached
    outputs = run_to_completion(engine)
    assert outputs["b"][-1].cached_tokens == 20  # five full blocks of the shared prefix
    assert outputs["c"][-1].cached_tokens == 20
    assert tokens_of(outputs["b"]) == reference_greedy(reference, second, 12)
    assert tokens_of(outputs["c"]) == reference_greedy(reference, first, 12)


def test_prefix_caching_can_be_disabled(tiny_model_dir):
    engine = make_engine(tiny_model_dir, block_size=4, enable_prefix_caching=False)
    prompt = list(range(5, 30))
    engine.submit("a", prompt, GREEDY)
    run_to_completion(engine)
    engine.submit("b", prompt, GREEDY)
    assert run_to_completion(engine)["b"][-1].cached_tokens == 0


def test_seeded_sampling_is_reproducible_and_independent_of_batch(tiny_model_dir):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    alone = make_engine(tiny_model_dir)
    alone.submit("x", prompt, params)
    a = tokens_of(run_to_completion(alone)["x"])
    crowded = make_engine(tiny_model_dir)
    crowded.submit("noise", [9, 10], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
    crowded.submit("x", prompt, params)
    b = tokens_of(run_to_completion(crowded)["x"])
    assert a == b
    other = make_engine(tiny_model_dir)
    other.submit("x", prompt, SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True))
    assert tokens_of(run_to_completion(other)["x"]) != a


def test_stop_string_truncates_text(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    engine.submit("free", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    full = "".join(o.text for o in run_to_completion(engine)["free"])
    stop = full[10:13]
    assert stop.strip() and full.find(stop) >= 3
    engine.submit("stopped", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)))
    outputs = run_to_completion(engine)["stopped"]
    assert "".join(o.text for o in outputs) == full[: full.find(stop)]
    assert outputs[-1].finish_reason == "stop"


def test_eos_stops_unless_ignored(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    eos = next(iter(engine.eos_token_ids))
    # Force EOS: a hook on the output layer makes EOS win every argmax.
    def favour_eos(module, inputs, logits):
        logits[..., eos] += 1e4

    engine.runner.model.get_output_embeddings().register_forward_hook(favour_eos)
    engine.submit("eos", [5, 6], SamplingParams(max_tokens=5, temperature=0))
    engine.submit("ignored", [5, 6], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    outputs = run_to_completion(engine)
    assert outputs["eos"][-1].finish_reason == "stop" and outputs["eos"][-1].completion_tokens == 1
    assert outputs["ignored"][-1].finish_reason == "length" and outputs["ignored"][-1].completion_tokens == 5


def test_max_model_len_is_enforced(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_model_len=32)
    with pytest.raises(PromptTooLongError, match="maximum context length is 32"):
        engine.submit("long", list(range(3, 35)), GREEDY)
    with pytest.raises(PromptTooLongError, match="requested 40 tokens"):
        engine.submit("too-much", list(range(3, 23)), SamplingParams(max_tokens=20))
    # Without an explicit bound the sequence stops at max_model_len.
    engine.submit("fits", list(range(3, 23)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    out = run_to_completion(engine)["fits"][-1]
    assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 32


def test_abort_frees_blocks_at_once(tiny_model_dir):
    engine = make_engine(tiny_model_dir, block_size=4)
    engine.submit("a", list(range(3, 40)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort("a")
    outputs = engine.step()
    assert outputs[-1].finish_reason == "abort" and outputs[-1].finished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_work()


def test_lowering_max_num_seqs_pauses_without_dropping(tiny_model_dir, reference):
    engine = make_engine(tiny_model_dir, max_num_seqs=6)
    prompts = mixed_prompts(len(engine.tokenizer), 6, seed=3)
    for i, p in enumerate(prompts):
        engine.submit(str(i), p, GREEDY)
    outputs: dict[str, list] = {}
    for _ in range(3):
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append(o)
    assert len(engine.scheduler.running) == 6
    engine.set_batch_limits(2, 64)
    for o in engine.step():
        outputs.setdefault(o.request_id, []).append(o)
    assert len(engine.scheduler.running) == 2  # takes effect at the next step
    assert engine.metrics.running._value.get() == 2
    for rid, outs in run_to_completion(engine).items():
        outputs.setdefault(rid, []).extend(outs)
    for i, p in enumerate(prompts):
        assert tokens_of(outputs[str(i)]) == reference_greedy(reference, p, 12)


def test_invalid_batch_limits_are_rejected(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    with pytest.raises(ValueError, match="must be >= max_num_seqs"):
        engine.set_batch_limits(64, 32)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.set_batch_limits(0, 32)
    assert engine.batch_limits == {"max_num_seqs": 64, "max_num_batched_tokens": 2048}


def test_waiting_queue_is_bounded(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_waiting_requests=2)
    engine.submit("a", [5], GREEDY)
    engine.submit("b", [5], GREEDY)
    with pytest.raises(QueueFullError):
        engine.submit("c", [5], GREEDY)
    assert set(run_to_completion(engine)) == {"a", "b"}


def test_pool_smaller_than_max_model_len_is_a_config_error(tiny_model_dir):
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        make_engine(tiny_model_dir, num_kv_blocks=2, block_size=16, max_model_len=256)


# --- block manager unit tests -------------------------------------------------------------------------


def _seq(tokens):
    return Sequence(list(tokens), SamplingParams())


def test_block_manager_shares_and_evicts_prefix_blocks_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    assert bm.num_free_blocks == 1
    b = _seq([1, 2, 3, 4, 9])
    assert bm.match_prefix(b) == a.block_table[:2]
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    # Freed full blocks stay cached; the partial block is reused first.
    prefix = bm.match_prefix(b)
    assert len(prefix) == 2
    assert bm.new_blocks_needed(b, 1, prefix) == 3  # one new block + two revived from the free list
    bm.adopt_prefix(b, prefix)
    bm.allocate(b, 1)
    assert b.num_computed_tokens == 4 and bm.num_free_blocks == 1
    # A new unrelated sequence evicts the cached blocks it needs, oldest first.
    c = _seq([7, 7, 7])
    bm.free_sequence(b)
    bm.allocate(c, 3)
    assert bm.num_free_blocks == 2


def test_block_manager_refuses_overallocation():
    bm = BlockManager(num_blocks=1, block_size=2)
    with pytest.raises(RuntimeError, match="KV cache exhausted"):
        bm.allocate(_seq([1, 2, 3]), 3)


def _random_model_dir(tmp_path, tiny_model_dir, config) -> str:
    """A random model of another architecture, saved with the tiny tokenizer, loaded like any local model."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = tmp_path / config.model_type
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(tiny_model_dir) / name).exists():
            shutil.copy(Path(tiny_model_dir) / name, out / name)
    return str(out)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "mistral"])
def test_other_architectures_match_generate(tmp_path, tiny_model_dir, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=1024)
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        config = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      **common)
    model_dir = _random_model_dir(tmp_path, tiny_model_dir, config)
    engine = make_engine(model_dir, max_num_batched_tokens=16, max_num_seqs=8, block_size=4)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = mixed_prompts(1024, 5, seed=4)
    for i, p in enumerate(prompts):
        engine.submit(str(i), p, GREEDY)
    outputs = run_to_completion(engine)
    for i, p in enumerate(prompts):
        assert tokens_of(outputs[str(i)]) == reference_greedy(reference, p, 12), f"{arch} prompt {i}"


def test_sliding_window_caps_max_model_len_and_softcapping_is_refused():
    from types import SimpleNamespace

    from tideserve.worker.model_runner import supported_attention_window

    mistral = SimpleNamespace(sliding_window=4096)
    assert supported_attention_window(mistral) == 4096
    qwen2 = SimpleNamespace(sliding_window=4096, use_sliding_window=False)
    assert supported_attention_window(qwen2) is None
    assert supported_attention_window(SimpleNamespace()) is None
    with pytest.raises(ValueError, match="soft-capping"):
        supported_attention_window(SimpleNamespace(attn_logit_softcapping=50.0))


def test_sampler_draws_from_the_distribution_after_top_k_and_top_p():
    # log-probabilities of 0.5, 0.3, 0.15, 0.05: top_k=3 drops the last token, top_p=0.75 then keeps the first
    # two (0.5 + 0.3 crosses it); the kept ones renormalise to 0.625 and 0.375.
    row = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    sampler = Sampler(seed=1)
    draws = 4000
    params = [SamplingParams(temperature=1.0, top_k=3, top_p=0.75)] * draws
    counts = torch.bincount(torch.tensor(sampler.sample(row.repeat(draws, 1), params, list(range(draws)))),
                            minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / draws - 0.625) < 0.03
    # Without the filters every token is drawn about as often as its probability.
    counts = torch.bincount(torch.tensor(sampler.sample(row.repeat(draws, 1), [SamplingParams()] * draws,
                                                        list(range(draws)))), minlength=4).tolist()
    assert abs(counts[1] / draws - 0.3) < 0.03 and abs(counts[3] / draws - 0.05) < 0.02


def test_async_engine_builds_and_steps_the_engine_in_one_thread(tiny_model_dir):
    # torch compute from two threads oversubscribes OpenMP (AsyncEngine's docstring): the model loads and every
    # step runs in the loop's thread, and an error while building reaches the caller.
    import asyncio
    import threading

    from tideserve.worker.async_engine import AsyncEngine

    threads = set()

    def build():
        threads.add(threading.current_thread().name)
        engine = make_engine(tiny_model_dir)
        step = engine.step
        engine.step = lambda: threads.add(threading.current_thread().name) or step()
        return engine

    async def generate():
        async_engine = AsyncEngine(build)
        async_engine.start()
        try:
            return [o async for o in async_engine.generate([5, 6, 7], GREEDY)]
        finally:
            async_engine.stop()

    assert asyncio.run(generate())[-1].finished
    assert threads == {"engine-loop"}

    def refuse():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(refuse)
