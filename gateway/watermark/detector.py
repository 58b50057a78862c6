"""The watermark detector: the configured keys and each model's tokenizer; scores texts.

:class:`WatermarkDetector` loads each model's tokenizer (HF ``tokenizers``, from the model
directory's ``tokenizer.json``) on first use and scores texts with every key;
:class:`AnswerCheck` is the check of one model's answers, which the answer filter
(:mod:`gateway.watermark.answer_filter`) and the endpoint use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from gateway.config import WatermarkSettings
from gateway.errors import ServiceUnavailable
from inference.watermark import Detection, WatermarkParams, detect_pairs

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("bastion.watermark")

# Longer answers are tokenized in a thread (about 1 ms of CPU per 4,000 characters),
# shorter ones inline: a thread hop costs more than they do.
INLINE_CHARS = 16_384


class TokenizerUnavailable(ServiceUnavailable):
    code = "tokenizer_unavailable"


def header_value(found: Detection) -> bytes:
    if found.watermarked:
        return f"watermarked; z={found.z_score:.2f}; key={found.key_id}".encode()
    return f"absent; z={found.z_score:.2f}".encode()


class WatermarkDetector:
    """The configured keys and per-model tokenizers; scores texts with every key."""

    def __init__(self, settings: WatermarkSettings, keys: Mapping[str, int]) -> None:
        self.params = WatermarkParams(
            key=0, gamma=settings.gamma, delta=settings.delta, z_threshold=settings.z_threshold
        )
        self.keys = dict(keys)
        self._paths = {
            model: path if path.is_file() else path / "tokenizer.json"
            for model, path in settings.tokenizers.items()
        }
        self._tokenizers: dict[str, Tokenizer] = {}
        self._failed: dict[str, TokenizerUnavailable] = {}
        self._loading = asyncio.Lock()
        self._checks = {model: AnswerCheck(self, model) for model in self._paths}

    def models(self) -> list[str]:
        """The models with a tokenizer, in configuration order."""
        return list(self._paths)

    def for_model(self, model: str) -> AnswerCheck | None:
        """The check for answers of ``model``, or None when it has no tokenizer."""
        return self._checks.get(model)

    async def tokenizer(self, model: str) -> Tokenizer:
        """``model``'s tokenizer, loaded (in a thread) on first use, then kept.

        A file that cannot be loaded is tried once per process: fix it and restart.
        """
        found = self._tokenizers.get(model)
        if found is not None:
            return found
        async with self._loading:
            if model in self._failed:
                raise self._failed[model]
            if model not in self._tokenizers:
                try:
                    self._tokenizers[model] = await asyncio.to_thread(self._load, model)
                except TokenizerUnavailable as exc:
                    self._failed[model] = exc
                    raise
        return self._tokenizers[model]

    def _load(self, model: str) -> Tokenizer:
        from tokenizers import Tokenizer

        path = self._paths[model]
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for bad files
            log.error("cannot load the tokenizer of %s from %s: %s", model, path, exc)
            raise TokenizerUnavailable(
                f"The tokenizer of model '{model}' could not be loaded."
            ) from exc
        log.info("loaded the tokenizer of %s from %s", model, path)
        return tokenizer

    def score_ids(self, segments: list[list[int]]) -> Detection:
        """Score token sequences generated separately (choices, text fields) together."""
        pairs = [np.asarray(ids, dtype=np.int64) for ids in segments if len(ids) > 1]
        if pairs:
            prev = np.concatenate([ids[:-1] for ids in pairs])
            tokens = np.concatenate([ids[1:] for ids in pairs])
        else:
            prev = tokens = np.zeros(0, dtype=np.int64)
        return detect_pairs(self.keys, self.params, prev, tokens)

    async def score_texts(
        self, model: str, texts: list[str], *, in_thread: bool | None = None
    ) -> tuple[Detection, int]:
        """The verdict on texts ``model`` generated, and how many tokens they encode to.

        The work runs in a thread when ``in_thread``, or (None) when the texts are long.
        """
        tokenizer = await self.tokenizer(model)

        def run() -> tuple[Detection, int]:
            # encode_batch_fast: no character offsets, a quarter faster than encode.
            encoded = tokenizer.encode_batch_fast([t for t in texts if t], add_special_tokens=False)
            segments = [e.ids for e in encoded]
            return self.score_ids(segments), sum(len(ids) for ids in segments)

        if in_thread is None:
            in_thread = sum(len(t) for t in texts) > INLINE_CHARS
        if not in_thread:
            return run()
        return await asyncio.to_thread(run)


class AnswerCheck:
    """The watermark check of one model's answers."""

    def __init__(self, detector: WatermarkDetector, model: str) -> None:
        self._detector = detector
        self.model = model

    async def detection(self, texts: list[str]) -> Detection | None:
        """The verdict on the answer's texts; None when they cannot be scored."""
        try:
            found, _ = await self._detector.score_texts(self.model, texts)
        except TokenizerUnavailable:
            return None  # logged where it failed; the answer itself is fine
        return found

    async def verdict(self, texts: list[str]) -> bytes | None:
        """The header value for the answer's texts; None when it cannot be scored."""
        found = await self.detection(texts)
        return None if found is None else header_value(found)
