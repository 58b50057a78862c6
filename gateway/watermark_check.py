"""Watermark verdicts on the model's answers: tokenize the text, score it, say so.

The scheme (Kirchenbauer et al. 2023) lives in :mod:`inference.watermark`; this module
brings it the text. :class:`WatermarkDetector` holds the configured keys and loads each
model's tokenizer (HF ``tokenizers``, from the model directory's ``tokenizer.json``) on
first use. It answers:

- proxied non-streamed answers: ``x-bastion-watermark: watermarked; z=5.12; key=k1``
  (or ``absent; z=0.41``), and ``bastion_watermark_verdicts_total{verdict}``;
- proxied streams: the same verdict as a final SSE comment, ``: x-bastion-watermark:
  ...``, sent just before ``data: [DONE]`` (comments are ignored by SSE clients);
- ``POST /v1/watermark/detect {text, model}`` for auditors.

The scorer sees the text's tokens, not the tokens the model sampled: re-encoding a
decoded answer mostly gives them back, and where it does not (a non-canonical
tokenization) only the few bigrams around the difference change, so the verdict holds.
Each choice and each text field (content, reasoning) is tokenized on its own: the pairs
across their boundaries were never generated one after the other.

With ``watermark.enabled: false`` no object of this module exists and the proxy does no
work at all for watermarks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.answer_text import answer_text_of
from gateway.asgi import read_body
from gateway.config import ConfigError, WatermarkSettings
from gateway.errors import InvalidRequest, ModelNotFound, NotFound, ServiceUnavailable
from gateway.pipeline import CallContext
from gateway.schemas import parse_json_model
from inference import watermark_keys
from inference.watermark import Detection, WatermarkParams, derive_key, detect_pairs
from inference.watermark_keys import KEYS_ENV_VAR

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("bastion.watermark")

HEADER = b"x-bastion-watermark"
# Longer answers are tokenized in a thread (about 1 ms of CPU per 4,000 characters),
# shorter ones inline: a thread hop costs more than they do.
INLINE_CHARS = 16_384
STATE_KEY = "watermark.header"
"""Where the verdict (the header value) is left on the call, for the audit entry."""


class TokenizerUnavailable(ServiceUnavailable):
    code = "tokenizer_unavailable"


# --- keys -----------------------------------------------------------------------------------


def parse_keys(text: str, source: str) -> dict[str, bytes]:
    """``key_id: base64`` lines (``#`` comments) or a JSON object, into secrets by key id."""
    try:
        return watermark_keys.parse_keys(text, source)
    except watermark_keys.KeyFileError as exc:
        raise ConfigError(str(exc)) from exc


def load_watermark_keys(
    settings: WatermarkSettings, environ: Mapping[str, str] = os.environ
) -> dict[str, int]:
    """Every configured watermark key (64-bit, derived from its secret) by key id."""
    try:
        secrets = watermark_keys.load_secrets(settings.keys_file, environ, "watermark.keys_file")
    except watermark_keys.KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    if not secrets:
        raise ConfigError(
            f"watermark.enabled: no watermark keys; set watermark.keys_file or {KEYS_ENV_VAR}"
        )
    return {key_id: derive_key(secret, key_id) for key_id, secret in secrets.items()}


# --- the detector ----------------------------------------------------------------------------


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


class WatermarkFilter:
    """Scores one call's answer: a header on a whole answer, a comment before a stream's
    ``[DONE]`` (or at its end). Reads the texts the answer-text filter gathered."""

    __slots__ = ("_call", "_check", "_sent")

    def __init__(self, check: AnswerCheck, call: CallContext) -> None:
        self._check = check
        self._call = call
        self._sent = False

    async def feed(self, data: bytes) -> bytes:
        if self._sent:
            return data
        if not self._call.stream:
            verdict = await self._verdict()
            if verdict is not None:
                self._call.add_header(HEADER, verdict)
            return data
        done_at = _done_offset(data) if b"[DONE]" in data else -1
        if done_at < 0:
            return data
        return data[:done_at] + await self.close() + data[done_at:]

    async def close(self) -> bytes:
        """The verdict comment, unless it was sent already."""
        if self._sent or not self._call.stream:
            return b""
        verdict = await self._verdict()
        return b"" if verdict is None else b": " + HEADER + b": " + verdict + b"\n\n"

    async def _verdict(self) -> bytes | None:
        self._sent = True
        text = answer_text_of(self._call)
        if text is None or not text.readable:
            return None
        found = await self._check.detection(text.texts())
        if found is None:
            return None
        event = self._call.event
        event.watermark = "watermarked" if found.watermarked else "absent"
        event.watermark_z = found.z_score
        event.watermark_key = found.key_id if found.watermarked else None
        verdict = header_value(found)
        self._call.state[STATE_KEY] = verdict.decode("ascii")
        return verdict


def _done_offset(events: bytes) -> int:
    """Where the ``data: [DONE]`` line starts in ``events``, or -1."""
    offset = 0
    for line in events.splitlines(keepends=True):
        if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
            return offset
        offset += len(line)
    return -1


class WatermarkFilterSource:
    """The watermark filter of calls to a model with a tokenizer (answer filters)."""

    def __init__(self, detector: WatermarkDetector) -> None:
        self._detector = detector

    def for_call(self, call: CallContext) -> WatermarkFilter | None:
        check = self._detector.for_model(call.event.model_served or "")
        return None if check is None else WatermarkFilter(check, call)


# --- POST /v1/watermark/detect -------------------------------------------------------------


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr
    model: StrictStr | None = None


class WatermarkEndpoint:
    """``POST /v1/watermark/detect``: is this text watermarked by one of our keys?"""

    def __init__(self, detector: WatermarkDetector | None, max_body_bytes: int) -> None:
        self._detector = detector
        self._max_body_bytes = max_body_bytes

    async def detect(self, request: Request) -> Response:
        detector = self._detector
        if detector is None:
            raise NotFound(
                "Watermark detection is not enabled on this gateway (watermark.enabled).",
                code="watermark_disabled",
            )
        raw = await read_body(request.scope, request.receive, self._max_body_bytes)
        spec = parse_json_model(raw, DetectRequest)
        model = self._model(detector, spec.model)
        found, tokens = await detector.score_texts(model, [spec.text], in_thread=True)
        return JSONResponse(
            {
                "object": "watermark.detection",
                "model": model,
                "watermarked": found.watermarked,
                "z_score": found.z_score,
                "p_value": found.p_value,
                "tokens": tokens,
                "scored": found.scored,
                "green": found.green,
                "key_id": found.key_id if found.watermarked else None,
            }
        )

    @staticmethod
    def _model(detector: WatermarkDetector, model: str | None) -> str:
        models = detector.models()
        if model is None:
            if len(models) == 1:
                return models[0]
            raise InvalidRequest(
                "'model' is required: choose one of the models with a tokenizer "
                f"({', '.join(models) or 'none configured'}).",
                param="model",
            )
        if model not in models:
            raise ModelNotFound(
                f"The model '{model}' has no tokenizer for watermark detection "
                "(watermark.tokenizers).",
                param="model",
            )
        return model
