"""Bastion's watermark as a vLLM V1 logits processor (``--logits-processors`` this class).

Before each token is sampled, every watermarked row of the batch gets ``delta`` added
to the logits of its green list, which :mod:`inference.watermark` derives from the row's
previous token (the last generated one, or the prompt's last on the first step). The
whole ``[rows, vocab]`` mask is built with batched integer tensor operations; the only
Python loop is over the batch's rows, to read each one's previous token.

Configuration comes from the environment, under the same names the gateway reads, so
one set of variables configures both sides of a stack:

- ``BASTION_WATERMARK__KEYS_FILE`` and/or ``BASTION_WATERMARK_KEYS`` (see
  :mod:`inference.watermark_keys`); ``BASTION_WATERMARK__GENERATION_KEY_ID`` picks the
  key that generates (default: the last one listed);
- ``BASTION_WATERMARK__GAMMA`` (0.25) and ``BASTION_WATERMARK__DELTA`` (2.0);
- ``BASTION_VLLM_WATERMARK_COMPILE``: ``auto`` (default: fuse the mask into one kernel
  with ``torch.compile`` on GPUs, run it eagerly on CPUs), ``on`` or ``off``.

Per-request opt-out: ``"vllm_xargs": {"bastion_watermark": "off"}`` in the request body.
The gateway lets it through only for roles allowed to opt out (``watermark:opt_out``)
and refuses it for everyone else, so a client cannot strip the watermark by asking.
Any other value of ``bastion_watermark`` is refused with HTTP 400 by vLLM.

Speculative decoding is not supported: vLLM does not run custom logits processors on
draft tokens, so the processor refuses to start with it rather than mark text unevenly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from inference.watermark import WatermarkParams, finish, row_state, token_words
from inference.watermark_keys import generation_key_id, load_secrets

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("bastion.vllm_watermark")

OPT_OUT_ARG = "bastion_watermark"
OPT_OUT_VALUE = "off"
ENV_PREFIX = "BASTION_WATERMARK__"
COMPILE_ENV_VAR = "BASTION_VLLM_WATERMARK_COMPILE"
# Rows are hashed in blocks: a [rows, vocab] int64 temporary for 256 rows of a 152k
# vocabulary would be 300 MB per intermediate when not compiled.
ROW_BLOCK = 64


def params_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, WatermarkParams]:
    """The generating key id and its parameters, from the environment (errors name the variable)."""
    keys_file = environ.get(f"{ENV_PREFIX}KEYS_FILE")
    secrets = load_secrets(
        Path(keys_file) if keys_file else None, environ, f"{ENV_PREFIX}KEYS_FILE"
    )
    key_id = generation_key_id(
        secrets, environ.get(f"{ENV_PREFIX}GENERATION_KEY_ID") or None, "the watermark keys"
    )
    knobs: dict[str, float] = {}
    for name in ("gamma", "delta"):
        text = environ.get(f"{ENV_PREFIX}{name.upper()}")
        if text:
            try:
                knobs[name] = float(text)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: not a number: {text!r}") from exc
    params = WatermarkParams.from_secret(secrets[key_id], key_id, **knobs)
    if not 0 <= params.delta <= 20:
        raise ValueError(f"{ENV_PREFIX}DELTA: must be between 0 and 20, not {params.delta}")
    return key_id, params


def wants_watermark(params: SamplingParams) -> bool:
    """False only when the request opted out (which the gateway allows only some roles)."""
    extra = params.extra_args or {}
    return extra.get(OPT_OUT_ARG) != OPT_OUT_VALUE


def add_green_bias(
    logits: torch.Tensor, states: torch.Tensor, words: torch.Tensor, threshold: int, delta: float
) -> torch.Tensor:
    """``logits[i, v] + delta`` where token ``v`` is green after row ``i``'s previous token.

    ``states`` is ``row_state(key, prev)`` per row ``[rows, 1]``, ``words`` the vocabulary's
    cached ``token_words`` ``[1, vocab]``; both int64 on the logits' device.
    """
    green = finish(states, words) < threshold
    return logits + green.to(logits.dtype) * delta


@dataclass(slots=True)
class _Row:
    """One watermarked request in the batch: where to read its previous token."""

    prompt_last: int | None
    output_ids: list[int]  # vLLM's live list of the request's generated tokens

    def previous_token(self) -> int | None:
        return self.output_ids[-1] if self.output_ids else self.prompt_last


class WatermarkLogitsProcessor(LogitsProcessor):
    """Adds ``delta`` to the green logits of every row that did not opt out."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(OPT_OUT_ARG)
        if value is not None and value != OPT_OUT_VALUE:
            raise ValueError(
                f"vllm_xargs.{OPT_OUT_ARG}: the only accepted value is {OPT_OUT_VALUE!r}"
            )

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("Bastion's watermark processor does not support speculative decoding")
        self.key_id, self.params = params_from_env()
        self._device = torch.device(device)
        self._rows: dict[int, _Row] = {}
        self._words: torch.Tensor | None = None  # [1, vocab] int64, built on first use
        self._bias = _choose_kernel(self._device, os.environ.get(COMPILE_ENV_VAR, "auto"))
        log.info(
            "watermark on: key %s, gamma %.3f, delta %.2f",
            self.key_id,
            self.params.gamma,
            self.params.delta,
        )

    def is_argmax_invariant(self) -> bool:
        return False  # the bias can change the most likely token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)

    @staticmethod
    def _new_row(
        params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> _Row | None:
        if not wants_watermark(params):
            return None
        return _Row(prompt_ids[-1] if prompt_ids else None, output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        indices: list[int] = []
        previous: list[int] = []
        for index, row in self._rows.items():
            token = row.previous_token()
            if token is not None and token >= 0 and index < logits.shape[0]:
                indices.append(index)
                previous.append(token)
        if not indices:
            return logits
        words = self._vocabulary_words(logits.shape[-1])
        prev = torch.tensor(previous, dtype=torch.int64).to(self._device, non_blocking=True)
        states = row_state(self.params.key, prev)[:, None]
        threshold, delta = self.params.threshold, self.params.delta
        if len(indices) == logits.shape[0] and indices == list(range(len(indices))):
            for start in range(0, len(indices), ROW_BLOCK):
                block = slice(start, start + ROW_BLOCK)
                logits[block] = self._bias(logits[block], states[block], words, threshold, delta)
            return logits
        rows = torch.tensor(indices, dtype=torch.int64).to(self._device, non_blocking=True)
        for start in range(0, len(indices), ROW_BLOCK):
            block_rows = rows[start : start + ROW_BLOCK]
            biased = self._bias(
                logits.index_select(0, block_rows),
                states[start : start + ROW_BLOCK],
                words,
                threshold,
                delta,
            )
            logits.index_copy_(0, block_rows, biased)
        return logits

    def _vocabulary_words(self, vocab_size: int) -> torch.Tensor:
        if self._words is None or self._words.shape[-1] != vocab_size:
            ids = torch.arange(vocab_size, dtype=torch.int64, device=self._device)
            self._words = token_words(ids)[None, :]
        return self._words


BiasKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def _choose_kernel(device: torch.device, setting: str, backend: str = "inductor") -> BiasKernel:
    """The eager function, or one fused kernel from ``torch.compile`` (GPU default).

    ``fullgraph=True``: a graph break would silently fall back to ~30 separate kernels.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"{COMPILE_ENV_VAR}: auto, on or off, not {setting!r}")
    compile_it = setting == "on" or (setting == "auto" and device.type == "cuda")
    if not compile_it:
        return add_green_bias
    compiled: Any = torch.compile(add_green_bias, dynamic=True, fullgraph=True, backend=backend)
    return compiled  # type: ignore[no-any-return]
