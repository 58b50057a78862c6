"""The dev model: a tiny Llama with random weights and a tokenizer trained here.

It makes the inference tier runnable and testable with no download and no GPU: vLLM (on
the CPU too) loads it like any Hugging Face Llama directory. It writes nonsense, but
real nonsense: real tokens through a real tokenizer, a real chat template, real sampling,
which is all the gateway, the watermark and the tests need.

Everything is a pure function of the seed: the tokenizer is trained on the text shipped
beside this module (``dev_corpus.txt``; BPE training is deterministic for a fixed input
and trainer), the weights are drawn from numpy's PCG64 seeded with it, and every file is
written with a fixed key order, so the same seed gives byte-identical files (checked by
``tests/inference/test_dev_model.py``). numpy, tokenizers and safetensors only: no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

CORPUS = Path(__file__).with_name("dev_corpus.txt")
# Llama's order: <unk> 0, <s> 1, </s> 2; then padding.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
VOCAB_SIZE = 4000
INIT_STD = 0.02

# Zephyr-style turns; the template adds <s> itself (vLLM tokenizes chat prompts without
# special tokens), and each turn ends with </s> so that the model's answer can end too.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token ~ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DevModelShape:
    """The architecture's sizes. vLLM's CPU attention needs a head size of 32 or more."""

    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    max_position_embeddings: int = 2048


class DevModelExists(Exception):
    """The target directory holds something and overwriting was not asked for (or unsafe)."""


def corpus_lines(path: Path = CORPUS) -> list[str]:
    """The training text: non-empty lines that are not ``#`` comments."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def train_tokenizer(lines: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE (GPT-2 style) with Llama's special tokens; <s> starts each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer, length=len(lines))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return tokenizer


def model_config(vocab_size: int, shape: DevModelShape = DevModelShape()) -> dict[str, Any]:
    """``config.json`` of a Hugging Face ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
    }


def parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama parameter names and shapes, in the order they are drawn."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden)
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.self_attn.q_proj.weight"] = (q_out, hidden)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (hidden, q_out)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def random_weights(config: dict[str, Any], seed: int) -> dict[str, FloatArray]:
    """Normal(0, 0.02) matrices and all-ones norms, float32, drawn in a fixed order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    weights: dict[str, FloatArray] = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            drawn = rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)
            weights[name] = drawn.astype(np.float32)
    return weights


def build_dev_model(
    directory: Path,
    *,
    seed: int = 0,
    force: bool = False,
    shape: DevModelShape = DevModelShape(),
    on_step: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the dev model into ``directory``; returns the files written.

    Built in a temporary directory beside it and moved in at the end, so an interrupted
    build leaves nothing half-written. An existing non-empty directory is replaced only
    with ``force``, and only if it holds nothing but a dev model's files.
    """
    from safetensors.numpy import save_file

    def step(what: str) -> None:
        if on_step is not None:
            on_step(what)

    directory = Path(directory)
    _check_target(directory, force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        step("training the tokenizer")
        tokenizer = train_tokenizer(corpus_lines())
        tokenizer.save(str(staging / "tokenizer.json"), pretty=True)
        vocab_size = int(tokenizer.get_vocab_size())
        config = model_config(vocab_size, shape)
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(shape))
        _write_json(
            staging / "special_tokens_map.json",
            {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD},
        )
        _write_json(staging / "config.json", config)
        _write_json(
            staging / "generation_config.json",
            {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
        step(f"drawing {sum(int(np.prod(s)) for s in parameter_shapes(config).values()):,} weights")
        save_file(
            random_weights(config, seed),
            str(staging / "model.safetensors"),
            metadata={"format": "pt"},
        )
        step(f"moving the model into {directory}")
        _replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [directory / name for name in FILES]


def _tokenizer_config(shape: DevModelShape) -> dict[str, Any]:
    special = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": special,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise DevModelExists(f"{directory} exists and is not a directory")
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if not entries:
        return
    if not force:
        raise DevModelExists(f"{directory} is not empty; --force replaces a dev model there")
    foreign = [name for name in entries if name not in FILES]
    if foreign:
        raise DevModelExists(
            f"{directory} holds {foreign[0]!r}, which a dev model does not: not replacing it"
        )


def _replace(staging: Path, directory: Path) -> None:
    # mkdtemp makes the directory 0700, and safetensors writes 0600: vLLM may run as
    # another user (a container), so make them readable as an ordinary download would be.
    staging.chmod(0o755)
    for name in FILES:
        (staging / name).chmod(0o644)
    if directory.is_dir():
        for name in FILES:
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()
    os.replace(staging, directory)
