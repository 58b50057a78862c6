"""The watermark of Kirchenbauer et al., "A Watermark for Large Language Models" (ICML 2023).

One pure module (numpy only) shared by the generator (the vLLM logits processor, torch)
and the detector (the gateway, numpy). Before each token is sampled, a keyed hash of the
previous token splits the vocabulary into a *green* share ``gamma`` and a red rest, and
``delta`` is added to the green logits. A text from the model then holds more green
tokens than chance; the detector counts them and answers with a one-sided z-test::

    z = (|s|_G - gamma * T) / sqrt(T * gamma * (1 - gamma))

**Green membership.** Token ``v`` is green after ``prev`` under ``key`` iff
``pair_hash(key, prev, v) < gamma * 2**32``, where ``pair_hash`` is MurmurHash3_x86_32 of
the three little-endian 32-bit words ``(key >> 32, prev, v)`` with seed ``key & 0xFFFFFFFF``
(``tests/inference`` checks it against the ``mmh3`` package). Token ids and ``prev``
are taken modulo 2**32.

Why a hash threshold rather than the paper's exact ``gamma * |V|`` permutation: the paper
seeds a PRNG with ``hash(prev)`` and permutes the vocabulary, one permutation per row,
which cannot be batched. A hash per (key, prev, token) gives a whole ``[batch, vocab]``
mask in a handful of vectorised integer operations on the GPU, and the detector needs
only one hash per token instead of a permutation. The price: the green list holds
``gamma * |V|`` tokens only on average (binomially, ±0.2 % of the vocabulary for 150k
tokens), and each token is green with probability ``gamma`` independently of the others,
which is exactly what the z-test assumes, so detection is unaffected.

**Bit-identical in numpy and torch.** :func:`row_state`, :func:`token_words` and
:func:`finish` use only ``* + & | ^ << >>`` on non-negative integers below 2**49: every
32-bit multiplication is split into two 16-bit halves (:func:`_mul32`), so no product
can overflow even in signed int64, right shifts only ever see non-negative values, and
every result is masked back to 32 bits. The same functions therefore run unchanged on
Python ints, numpy uint64/int64 arrays and torch int64 tensors, with the same bits.
The logits processor builds its mask from them::

    prev = input_ids[:, -1].to(torch.int64)                   # [batch]
    words = token_words(torch.arange(vocab, dtype=torch.int64, device=dev))  # cache it
    hashes = finish(row_state(params.key, prev[:, None]), words[None, :])
    logits += params.delta * (hashes < params.threshold)      # [batch, vocab]

which is :func:`green_mask` and :func:`bias_logits` below, in torch.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

MASK32 = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593  # MurmurHash3_x86_32 block constants
_ROUND_ADD = 0xE6546B64
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35  # its finaliser (fmix32)
_MESSAGE_BYTES = 12  # key_hi, prev, token
_KEY_LABEL = b"bastion/watermark/v1/"

ArrayT = TypeVar("ArrayT")
TokenArray = npt.NDArray[np.integer[Any]]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.floating[Any]]


# --- the hash: MurmurHash3_x86_32, written to give the same bits on any integer type ----


def _mul32(x: Any, c: int) -> Any:
    """``(x * c) mod 2**32`` for ``0 <= x, c < 2**32`` with no intermediate above 2**49."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint64:
        # The detector's fast path: below 2**64, so exact in uint64; same bits, 4 ops fewer.
        return (x * c) & MASK32
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _scramble(k: Any) -> Any:
    k = _mul32(k, _C1)
    k = ((k << 15) | (k >> 17)) & MASK32
    return _mul32(k, _C2)


def _round(h: Any, scrambled: Any) -> Any:
    h = h ^ scrambled
    h = ((h << 13) | (h >> 19)) & MASK32
    return (h * 5 + _ROUND_ADD) & MASK32


def key_state(key: int) -> int:
    """The hash state after the key's words (a Python int below 2**32)."""
    return int(_round(key & MASK32, _scramble((key >> 32) & MASK32)))


def row_state(key: int, prev: ArrayT) -> ArrayT:
    """The hash state after ``(key, prev)``: one value per row, shared by its whole vocabulary.

    ``prev`` holds non-negative integers (an int, a numpy or torch integer array).
    """
    p: Any = prev
    return cast(ArrayT, _round(key_state(key), _scramble(p & MASK32)))


def token_words(tokens: ArrayT) -> ArrayT:
    """The candidate tokens' scrambled words; independent of key and row, so cacheable."""
    t: Any = tokens
    return cast(ArrayT, _scramble(t & MASK32))


def finish(row: ArrayT, words: ArrayT) -> ArrayT:
    """``pair_hash`` from :func:`row_state` and :func:`token_words` (broadcasting)."""
    h: Any = _round(row, words)
    h = h ^ _MESSAGE_BYTES
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return cast(ArrayT, h ^ (h >> 16))


def pair_hash(key: int, prev: ArrayT, tokens: ArrayT) -> ArrayT:
    """MurmurHash3_x86_32 of ``(key >> 32, prev, token)`` seeded with the key's low word."""
    return finish(row_state(key, prev), token_words(tokens))


def derive_key(secret: bytes, key_id: str) -> int:
    """The 64-bit watermark key for ``key_id``: HMAC-SHA256 of the id under the secret.

    The secret never reaches the hash itself; one secret can serve several key ids.
    """
    digest = hmac.new(secret, _KEY_LABEL + key_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big")


# --- parameters and verdicts --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatermarkParams:
    """One key and the scheme's knobs: green share, logit bias, detection threshold."""

    key: int
    """64-bit key, from :func:`derive_key` (the secret itself never appears here)."""
    gamma: float = 0.25
    """Share of the vocabulary that is green after each token."""
    delta: float = 2.0
    """Bias added to green logits at generation (not used by detection)."""
    z_threshold: float = 4.0
    """z at or above which a text is called watermarked (one-sided p = 3.2e-5)."""

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), not {self.gamma}")
        if not 0 <= self.key < 2**64:
            raise ValueError("key must be a 64-bit unsigned integer")

    @classmethod
    def from_secret(cls, secret: bytes, key_id: str, **knobs: Any) -> WatermarkParams:
        return cls(key=derive_key(secret, key_id), **knobs)

    @property
    def threshold(self) -> int:
        """Hashes below this are green: ``round(gamma * 2**32)``."""
        return round(self.gamma * 2**32)


@dataclass(frozen=True, slots=True)
class Detection:
    """The verdict on one text (or one set of token pairs)."""

    z_score: float
    p_value: float
    """One-sided, from the normal survival function of z (1.0 when nothing was scored)."""
    green: int
    """Scored tokens that were green."""
    scored: int
    """T: the tokens scored (repeated bigrams counted once, by default)."""
    watermarked: bool
    key_id: str | None = None
    """The configured key that matched best (:func:`detect` only)."""


def z_score(green: int, scored: int, gamma: float) -> float:
    if scored == 0:
        return 0.0
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """One-sided normal tail ``P(Z >= z)`` (math.erfc: no scipy in the gateway)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


# --- numpy: masks and generation (the reference the torch processor follows) ------------


Words = npt.NDArray[np.uint64]
_U32, _UMASK32 = np.uint64(32), np.uint64(MASK32)


@lru_cache(maxsize=8)
def _vocab_words(vocab_size: int) -> Words:
    words = token_words(np.arange(vocab_size, dtype=np.uint64))
    words.flags.writeable = False
    return words


def _as_words(values: Any) -> Words:
    """Token ids as uint64 (numpy's path is all uint64: mixing in int64 would give floats)."""
    return np.asarray(values).astype(np.uint64, copy=False)


def green_mask(params: WatermarkParams, prev_tokens: TokenArray, vocab_size: int) -> BoolArray:
    """``[batch, vocab]``: which tokens are green after each row's previous token."""
    rows = row_state(params.key, _as_words(prev_tokens)[:, None])
    return finish(rows, _vocab_words(vocab_size)[None, :]) < params.threshold


def is_green(params: WatermarkParams, prev: TokenArray, tokens: TokenArray) -> BoolArray:
    """Element-wise: is ``tokens[i]`` green after ``prev[i]`` (any broadcastable shapes)."""
    hashes = pair_hash(params.key, _as_words(prev), _as_words(tokens))
    return np.asarray(hashes < params.threshold)


def bias_logits(params: WatermarkParams, logits: FloatArray, prev_tokens: TokenArray) -> FloatArray:
    """Reference generator: ``logits + delta`` on each row's green list (a new array)."""
    mask = green_mask(params, prev_tokens, logits.shape[-1])
    return np.asarray(logits + params.delta * mask)


# --- detection ---------------------------------------------------------------------------


def _unique_pairs(prev: Words, tokens: Words) -> tuple[Words, Words]:
    # np.unique does the same with three times the overhead on answer-sized arrays.
    codes = np.sort(_pair_codes(prev, tokens))
    if codes.size > 1:
        first = np.empty(codes.size, dtype=np.bool_)
        first[0] = True
        np.not_equal(codes[1:], codes[:-1], out=first[1:])
        codes = codes[first]
    return codes >> _U32, codes & _UMASK32


def _pair_codes(prev: Words, tokens: Words) -> Words:
    """``prev`` and ``token`` packed into one uint64 (both taken modulo 2**32)."""
    return ((prev & _UMASK32) << _U32) | (tokens & _UMASK32)


# Token ids below this have their scrambled word looked up rather than computed: one
# gather instead of seven array operations per side, which is most of the cost of
# scoring a short answer. 2**18 covers every tokenizer in use (Llama 3, Qwen: ~150k).
_WORD_TABLE_SIZE = 1 << 18


def _words_of(ids: Words) -> Words:
    """``token_words(ids)`` (``_scramble`` of the id), from the table where it covers them."""
    if ids.size and int(ids.max()) < _WORD_TABLE_SIZE:
        return _vocab_words(_WORD_TABLE_SIZE)[ids]
    return cast(Words, token_words(ids))


def _green_counts(keys: list[int], threshold: int, prev: Words, tokens: Words) -> list[int]:
    """How many of the pairs are green under each key: all keys in one vectorised pass."""
    if tokens.size == 0:
        return [0] * len(keys)
    if len(keys) == 1:
        hashes = finish(_round(_key_state(keys[0]), _words_of(prev)), _words_of(tokens))
        return [int(np.count_nonzero(hashes < threshold))]
    states = np.array([[_key_state(key)] for key in keys], dtype=np.uint64)  # [keys, 1]
    hashes = finish(_round(states, _words_of(prev)), _words_of(tokens))
    return [int(n) for n in np.count_nonzero(hashes < threshold, axis=1)]


@lru_cache(maxsize=64)
def _key_state(key: int) -> int:
    return key_state(key)


def _verdict(params: WatermarkParams, green: int, scored: int) -> Detection:
    z = z_score(green, scored, params.gamma)
    return Detection(
        z_score=z,
        p_value=p_value(z) if scored else 1.0,
        green=green,
        scored=scored,
        watermarked=scored > 0 and z >= params.z_threshold,
    )


def _prepared(
    prev: TokenArray, tokens: TokenArray, ignore_repeated_bigrams: bool
) -> tuple[Words, Words]:
    p, t = _as_words(prev).ravel(), _as_words(tokens).ravel()
    if p.shape != t.shape:
        raise ValueError("prev and tokens must have the same length")
    return _unique_pairs(p, t) if ignore_repeated_bigrams else (p, t)


def score_pairs(
    params: WatermarkParams,
    prev: TokenArray,
    tokens: TokenArray,
    *,
    ignore_repeated_bigrams: bool = True,
) -> Detection:
    """Score ``tokens[i]`` (each following ``prev[i]``): the z-test over their green count.

    ``ignore_repeated_bigrams`` (the paper's suggestion, on by default) counts each
    distinct ``(prev, token)`` pair once: repetitive text (lists, code, "the the the")
    would otherwise repeat the same green or red outcome, and the z-test, which assumes
    independent draws, would overstate the evidence both ways.
    """
    p, t = _prepared(prev, tokens, ignore_repeated_bigrams)
    [green] = _green_counts([params.key], params.threshold, p, t)
    return _verdict(params, green, int(t.size))


def pairs_of(token_ids: TokenArray) -> tuple[Words, Words]:
    """``(prev, token)`` for every token of a sequence but the first (its prev is unknown)."""
    ids = _as_words(token_ids).ravel()
    return ids[:-1], ids[1:]


def score(
    params: WatermarkParams, token_ids: TokenArray, *, ignore_repeated_bigrams: bool = True
) -> Detection:
    """Score one generated sequence under ``params.key`` (see :func:`score_pairs`)."""
    prev, tokens = pairs_of(token_ids)
    return score_pairs(params, prev, tokens, ignore_repeated_bigrams=ignore_repeated_bigrams)


def detect_pairs(
    keys: Mapping[str, int],
    params: WatermarkParams,
    prev: TokenArray,
    tokens: TokenArray,
    *,
    ignore_repeated_bigrams: bool = True,
) -> Detection:
    """Score under every configured key (key rotation); the best one, with its id.

    With ``k`` keys the chance that an unwatermarked text passes the threshold under
    some key is at most ``k`` times that of one key (3.2e-5 each at z = 4), so the
    returned ``p_value`` is Bonferroni-corrected: ``min(1, k * p)``.
    """
    if not keys:
        raise ValueError("no watermark keys")
    p, t = _prepared(prev, tokens, ignore_repeated_bigrams)
    counts = _green_counts(list(keys.values()), params.threshold, p, t)
    best = max(range(len(counts)), key=counts.__getitem__)  # same T: most green = best z
    found = _verdict(params, counts[best], int(t.size))
    key_id = list(keys)[best]
    return replace(found, key_id=key_id, p_value=min(1.0, found.p_value * len(keys)))


def detect(
    keys: Mapping[str, int],
    params: WatermarkParams,
    token_ids: TokenArray,
    *,
    ignore_repeated_bigrams: bool = True,
) -> Detection:
    """:func:`detect_pairs` over one generated sequence."""
    prev, tokens = pairs_of(token_ids)
    return detect_pairs(keys, params, prev, tokens, ignore_repeated_bigrams=ignore_repeated_bigrams)


@dataclass(frozen=True, slots=True)
class BatchScores:
    """Per-sequence results of :func:`score_batch`."""

    z_score: FloatArray
    green: npt.NDArray[np.int64]
    scored: npt.NDArray[np.int64]


def score_batch(
    params: WatermarkParams, token_ids: TokenArray, *, ignore_repeated_bigrams: bool = True
) -> BatchScores:
    """:func:`score` for many sequences of one length at once (``[n, length]``), vectorised."""
    ids = _as_words(token_ids)
    if ids.ndim != 2:
        raise ValueError("token_ids must be [sequences, length]")
    prev, tokens = ids[:, :-1], ids[:, 1:]
    green = is_green(params, prev, tokens)
    if ignore_repeated_bigrams:
        codes = _pair_codes(prev, tokens)
        order = np.argsort(codes, axis=1, kind="stable")
        ordered = np.take_along_axis(codes, order, axis=1)
        first = np.ones(codes.shape, dtype=bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        green = np.take_along_axis(green, order, axis=1) & first
        scored = first.sum(axis=1)
    else:
        scored = np.full(ids.shape[0], tokens.shape[1])
    greens = green.sum(axis=1)
    gamma = params.gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (greens - gamma * scored) / np.sqrt(scored * gamma * (1 - gamma))
    return BatchScores(
        z_score=np.where(scored > 0, z, 0.0),
        green=greens.astype(np.int64),
        scored=scored.astype(np.int64),
    )
