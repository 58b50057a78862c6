"""Scanners backed by an operator's own text classifier in PyTorch (a Hugging Face
``save_pretrained`` directory): the torch twin of gateway/guards/model_scanner.py (ONNX).

Why not llm-guard's own scanners: llm-guard 0.3.16 pins transformers 4.51.3 and, through
presidio, spaCy and nltk, would downgrade tokenizers (0.23 -> 0.21) and cryptography in
the gateway's environment, and its scanners fetch models from the hub. This adapter keeps
llm-guard's idea (a sequence classifier, a threshold, positive labels) behind
:class:`~gateway.guards.scanner.Scanner`, with the same settings as the ONNX scanner
(:class:`~gateway.guards.settings.LocalModelSettings`), and:

* loads only from the directory (``local_files_only``), never runs code from it
  (``trust_remote_code`` off) and reads only ``model.safetensors`` weights: a directory
  with only a pickled ``pytorch_model.bin`` is refused, since unpickling runs code;
* scores long texts window by window (``max_tokens`` each, the highest counts) rather
  than truncating at 512 tokens;
* declares ``heavy = True``, so the pipeline runs it in its worker pool under
  ``model_scanners.timeout_s`` (fail open or closed by policy).

Needs the optional extra ``guards-ml`` (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.guards.scanner import Finding, ScanContext
from gateway.guards.settings import LocalModelSettings


class TransformersUnavailable(RuntimeError):
    """torch or transformers is not installed (``pip install 'bastion[guards-ml]'``)."""


class TransformersModelInvalid(RuntimeError):
    """The directory is not a usable safetensors sequence-classification model."""


class TransformersClassifierScanner:
    """A PyTorch sequence classifier from a local directory as a scanner."""

    heavy = True

    def __init__(self, name: str, settings: LocalModelSettings) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as exc:
            raise TransformersUnavailable(
                f"guards.models.{name}: torch and transformers are needed "
                "(pip install 'bastion[guards-ml]')"
            ) from exc
        directory = Path(settings.path)
        if not (directory / "config.json").is_file():
            raise TransformersModelInvalid(f"guards.models.{name}: no config.json in {directory}")
        if not any(directory.glob("*.safetensors")):
            raise TransformersModelInvalid(
                f"guards.models.{name}: no *.safetensors weights in {directory} "
                "(pickled pytorch_model.bin files are not loaded)"
            )
        self.name = name
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self._model = AutoModelForSequenceClassification.from_pretrained(
            directory, local_files_only=True, use_safetensors=True, trust_remote_code=False
        ).eval()
        self._window = settings.max_tokens
        self._specials = self._special_tokens()
        # torch's intra-op pool is process-wide: the worker pool gives the parallelism.
        torch.set_num_threads(settings.threads)
        self._positive = self._label_indices(self._model.config.id2label, settings.positive_labels)
        self.default_threshold = settings.threshold

    @staticmethod
    def _label_indices(id2label: dict[int, str], labels: tuple[str | int, ...]) -> list[int]:
        names = {str(label).lower(): int(index) for index, label in id2label.items()}
        indices = []
        for label in labels:
            if isinstance(label, int):
                indices.append(label)
            elif label.lower() in names:
                indices.append(names[label.lower()])
            else:
                raise TransformersModelInvalid(f"label {label!r} is not in id2label {id2label}")
        return indices

    def windows(self, text: str) -> list[list[int]]:
        """Token ids per window, each with the model's special tokens around it."""
        ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix, suffix = self._specials
        room = self._window - len(prefix) - len(suffix)
        chunks = [ids[i : i + room] for i in range(0, len(ids), room)] or [[]]
        return [prefix + chunk + suffix for chunk in chunks]

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """What the tokenizer puts before and after a text ([CLS] ... [SEP], <s> ... </s>),
        found by encoding one word with and without them (transformers 4 and 5 alike)."""
        with_specials = self._tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = self._tokenizer("a", add_special_tokens=False)["input_ids"]
        for i in range(len(with_specials) - len(bare) + 1):
            if with_specials[i : i + len(bare)] == bare:
                return with_specials[:i], with_specials[i + len(bare) :]
        raise TransformersModelInvalid("cannot tell the tokenizer's special tokens apart")

    def score_ids(self, ids: list[int]) -> float:
        torch = self._torch
        with torch.inference_mode():
            logits: Any = self._model(input_ids=torch.tensor([ids])).logits[0]
            probabilities = torch.softmax(logits.double(), dim=-1)
        return float(probabilities[self._positive].sum())

    def score(self, text: str) -> float:
        return max(self.score_ids(ids) for ids in self.windows(text))

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        return Finding(score=self.score(text), suggested="block", detail=f"model {self.name}")
