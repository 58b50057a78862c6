"""Operator models: tiny random-weight ONNX classifiers built here, run from a directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from gateway.errors import GatewayError  # noqa: E402
from gateway.guards.input_check import InputGuard  # noqa: E402
from gateway.guards.model_scanner import ModelFilesMissing, ONNXClassifierScanner  # noqa: E402
from gateway.guards.output_filter import OutputGuard  # noqa: E402
from gateway.guards.scanner import ScanContext  # noqa: E402
from gateway.guards.settings import GuardSettings, LocalModelSettings  # noqa: E402
from tests.guards.calls import answer, chat, make_call  # noqa: E402

VOCAB = ["[UNK]", "hello", "world", "attack", "ignore", "rules", "please", "the"]


def build_model(directory: Path, *, seed: int = 0, trigger: str = "attack") -> Path:
    """Embedding -> mean over tokens -> linear -> 2 logits. Random weights, except that
    the ``trigger`` word's embedding pushes towards label 1 (so tests know the answer)."""
    rng = np.random.default_rng(seed)
    dim = 8
    embedding = rng.normal(0, 0.1, (len(VOCAB), dim)).astype(np.float32)
    embedding[VOCAB.index(trigger)] = 5.0
    weight = rng.normal(0, 0.1, (dim, 2)).astype(np.float32)
    weight[:, 1] += 1.0
    weight[:, 0] -= 1.0
    bias = np.array([1.5, -1.5], dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, None]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(embedding, "embedding"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({"id2label": {"0": "SAFE", "1": "UNSAFE"}}))
    return directory


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return build_model(tmp_path / "tiny")


def test_scores_from_a_local_directory(model_dir: Path) -> None:
    scanner = ONNXClassifierScanner(
        "toxicity", LocalModelSettings(path=str(model_dir), positive_labels=("unsafe",))
    )
    context = ScanContext(stage="input")
    high = scanner.scan("please attack the world", context)
    low = scanner.scan("hello world please", context)
    assert high is not None and low is not None
    assert high.score > 0.9 > 0.2 > low.score
    # A long text is scored window by window: the trigger at the very end still counts.
    long_text = "hello world " * 600 + "attack"
    windowed = ONNXClassifierScanner(
        "t", LocalModelSettings(path=str(model_dir), max_tokens=16, positive_labels=(1,))
    )
    assert windowed.score(long_text) > 0.9


def test_missing_files_and_labels_are_errors(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelFilesMissing):
        ONNXClassifierScanner("x", LocalModelSettings(path=str(tmp_path / "empty")))
    with pytest.raises(ValueError):
        ONNXClassifierScanner(
            "x", LocalModelSettings(path=str(model_dir), positive_labels=("toxic",))
        )


async def test_an_operator_model_replaces_the_shipped_classifier(model_dir: Path) -> None:
    settings = GuardSettings.model_validate(
        {
            "input": {"prompt_injection": {"action": "block"}},
            "models": {"prompt_injection": {"path": str(model_dir), "positive_labels": ["UNSAFE"]}},
        }
    )
    guard = InputGuard(settings)
    assert isinstance(guard.scanners["prompt_injection"], ONNXClassifierScanner)
    with pytest.raises(GatewayError) as refused:
        await guard.check(make_call(chat("please attack the world")))
    assert refused.value.code == "guard_blocked"
    call = make_call(chat("hello world"))
    await guard.check(call)
    verdict = next(v for v in call.event.guard_verdicts if v.scanner == "prompt_injection")
    assert verdict.action == "pass" and verdict.latency_s > 0
    guard.close()


async def test_a_new_model_scanner_on_both_stages(model_dir: Path) -> None:
    settings = GuardSettings.model_validate(
        {
            "models": {"toxicity": {"path": str(model_dir), "stages": ["input", "output"]}},
            "output": {"toxicity": {"action": "block"}},
            "roles": {"data_scientist": {"output": {"toxicity": {"enabled": False}}}},
        }
    )
    inputs, outputs = InputGuard(settings), OutputGuard(settings)
    call = make_call(chat("please attack"))
    await inputs.check(call)  # the input policy defaults to flag
    assert dict(call.response_headers)[b"x-bastion-guard"] == b"flag=toxicity"
    with pytest.raises(GatewayError) as refused:
        await outputs.for_call(call).feed(answer("attack attack"))  # type: ignore[union-attr]
    assert refused.value.status == 422
    scientist = make_call(chat("hello"), roles=("data_scientist",))
    await inputs.check(scientist)
    assert await outputs.for_call(scientist).feed(answer("attack attack"))  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        GuardSettings.model_validate({"output": {"toxicity": {"action": "block"}}})
