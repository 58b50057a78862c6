"""Scanners backed by an operator's own text classifier, exported to ONNX, from a local
directory: a Prompt Guard, a toxicity or topic model, in place of or beside the rules.

The directory holds ``model.onnx`` (a sequence classifier taking ``input_ids`` and,
if it declares them, ``attention_mask`` / ``token_type_ids``; its first output is the
logits ``[batch, labels]``), ``tokenizer.json`` (HF ``tokenizers``) and optionally
``config.json`` with ``id2label``. Nothing is fetched: a missing file is an error at
start-up. The score is the summed softmax probability of the ``positive_labels``.

Such a scanner declares ``heavy = True``: the pipeline runs it in its worker pool under
``model_scanners.timeout_s``, failing open or closed by policy. Long texts are scored in
windows of ``max_tokens`` (the highest window counts), so an injection at the end of a
long document is not truncated away (llm-guard's models read only the first 512 tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gateway.guards.scanner import Finding, ScanContext
from gateway.guards.settings import LocalModelSettings


class ModelFilesMissing(RuntimeError):
    """The configured directory lacks ``model.onnx`` or ``tokenizer.json``."""


class ONNXClassifierScanner:
    """A text classifier in ONNX as a scanner (see the module docstring)."""

    heavy = True

    def __init__(self, name: str, settings: LocalModelSettings) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.name = name
        directory = Path(settings.path)
        model, tokenizer = directory / "model.onnx", directory / "tokenizer.json"
        for needed in (model, tokenizer):
            if not needed.is_file():
                raise ModelFilesMissing(f"guards.models.{name}: no {needed.name} in {directory}")
        options = onnxruntime.SessionOptions()
        # One thread per run: the worker pool gives the parallelism, and the gateway's
        # event loop keeps a core.
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(tokenizer))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._window = settings.max_tokens
        self._positive = self._label_indices(directory, settings.positive_labels)
        self.default_threshold = settings.threshold

    @staticmethod
    def _label_indices(directory: Path, labels: tuple[str | int, ...]) -> list[int]:
        config = directory / "config.json"
        names: dict[str, int] = {}
        if config.is_file():
            id2label = json.loads(config.read_text()).get("id2label", {})
            names = {str(label).lower(): int(index) for index, label in id2label.items()}
        indices = []
        for label in labels:
            if isinstance(label, int):
                indices.append(label)
            elif label.lower() in names:
                indices.append(names[label.lower()])
            else:
                raise ValueError(f"label {label!r} is not in {config}'s id2label")
        return indices

    def score(self, text: str) -> float:
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids or [0]
        windows = [ids[i : i + self._window] for i in range(0, len(ids), self._window)]
        best = 0.0
        for window in windows:
            best = max(best, self._score_ids(window))
        return best

    def _score_ids(self, ids: list[int]) -> float:
        input_ids = np.asarray([ids], dtype=np.int64)
        feed: dict[str, Any] = {"input_ids": input_ids}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = np.ones_like(input_ids)
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        logits = np.asarray(self._session.run(None, feed)[0], dtype=np.float64)[0]
        exp = np.exp(logits - logits.max())
        probabilities = exp / exp.sum()
        return float(probabilities[self._positive].sum())

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        score = self.score(text)
        return Finding(score=score, suggested="block", detail=f"model {self.name}")
