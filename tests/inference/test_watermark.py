"""The watermark scheme (inference/watermark.py): the hash, and the statistics of detection.

Unwatermarked streams must score like a standard normal and almost never cross z = 4;
watermarked ones (sampled from a random "model" through the reference biasing) must.
"""

from __future__ import annotations

import itertools
import math
import struct

import mmh3
import numpy as np
import pytest

from inference.watermark import (
    MASK32,
    WatermarkParams,
    derive_key,
    detect,
    finish,
    green_mask,
    is_green,
    pair_hash,
    row_state,
    score,
    score_batch,
    score_pairs,
    token_words,
)
from tests.watermarking import sample

KEY = 0x0123456789ABCDEF
EDGES = [0, 2**31, 2**32 - 1]
PARAMS = WatermarkParams.from_secret(b"s" * 32, "k1")
VOCAB = 32_000


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) >= k), exactly."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


# --- the hash ------------------------------------------------------------------------------


def test_hash_is_murmur3_x86_32_of_key_prev_token() -> None:
    rng = np.random.default_rng(0)
    for key, prev, token in rng.integers(0, 2**32, (500, 3), dtype=np.uint64).tolist():
        key = key << 32 | (key * 2654435761 & MASK32)
        message = struct.pack("<III", key >> 32, prev, token)
        expected = mmh3.hash(message, key & MASK32, signed=False)
        assert pair_hash(key, prev, token) == expected


def test_hash_is_pinned_on_edge_values() -> None:
    # Computed once; a change of formula (or of integer behaviour) shows up here.
    expected = [
        [3751750249, 4286257121, 4012850739],
        [4130575182, 1830835250, 2092914444],
        [1692093734, 1397490521, 1337118287],
    ]
    assert [[pair_hash(KEY, p, t) for t in EDGES] for p in EDGES] == expected
    rows = green_mask(WatermarkParams(key=KEY), np.array(EDGES), 32)
    assert ["".join("G" if g else "." for g in row) for row in rows] == [
        "........GG...G.GG.G...G....G....",
        "............G....G.......G......",
        ".......GGG......GG..G.G.........",
    ]
    assert derive_key(bytes(range(32)), "k1") == 0x4F9A1E9D04024C8C


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_hash_is_bit_identical_on_any_integer_type(dtype: type[np.integer]) -> None:
    """Python ints, numpy uint64 and int64 (which wraps on overflow like torch's int64)
    give the same bits: no intermediate value ever needs more than 49 bits."""
    rng = np.random.default_rng(1)
    prev = np.concatenate([np.array(EDGES), rng.integers(0, 2**32, 2000)]).astype(dtype)
    tokens = np.concatenate([np.array(EDGES[::-1]), rng.integers(0, 2**32, 2000)]).astype(dtype)
    arrays = pair_hash(KEY, prev, tokens)
    assert arrays.dtype == dtype
    scalars = [pair_hash(KEY, int(p), int(t)) for p, t in zip(prev, tokens, strict=True)]
    assert arrays.tolist() == scalars
    assert int(arrays.max()) <= MASK32 and int(arrays.min()) >= 0
    # The split form the logits processor uses is the same function.
    assert finish(row_state(KEY, prev), token_words(tokens)).tolist() == scalars


def test_green_mask_agrees_with_is_green_and_holds_gamma() -> None:
    params = WatermarkParams(key=KEY, gamma=0.25)
    prev = np.array([0, 1, 17, 31_999, 2**31])
    mask = green_mask(params, prev, VOCAB)
    assert mask.shape == (5, VOCAB)
    expected = is_green(params, prev[:, None], np.arange(VOCAB)[None, :])
    assert np.array_equal(mask, expected)
    # Binomial(32000, 0.25): standard deviation 0.24 % of the vocabulary.
    assert np.all(np.abs(mask.mean(axis=1) - 0.25) < 0.015)
    # Rows for different previous tokens are different lists, overlapping by chance only.
    overlap = (mask[0] & mask[1]).mean()
    assert abs(overlap - 0.25**2) < 0.01


def test_params_are_checked() -> None:
    with pytest.raises(ValueError, match="gamma"):
        WatermarkParams(key=1, gamma=1.0)
    with pytest.raises(ValueError, match="64-bit"):
        WatermarkParams(key=2**64)
    assert WatermarkParams(key=1, gamma=0.5).threshold == 2**31
    assert derive_key(b"a" * 32, "k1") != derive_key(b"a" * 32, "k2")


# --- unwatermarked text ----------------------------------------------------------------------


def test_unwatermarked_z_is_standard_normal() -> None:
    rng = np.random.default_rng(2)
    streams = rng.integers(0, VOCAB, (2000, 200))
    scores = score_batch(PARAMS, streams)
    z = scores.z_score
    # Standard errors: mean 0.022, standard deviation 0.016.
    assert abs(z.mean()) < 0.1
    assert abs(z.std() - 1) < 0.07
    assert np.all(scores.scored >= 198)  # random bigrams almost never repeat
    # The batch form is the per-text form.
    for i in range(0, 2000, 397):
        one = score(PARAMS, streams[i])
        assert (one.green, one.scored) == (scores.green[i], scores.scored[i])
        assert one.z_score == pytest.approx(z[i])


def test_false_positive_rate_at_z4_is_below_1e4() -> None:
    """200,000 random streams of 200 tokens (40 M scored tokens).

    Under no watermark each scored token is green with probability gamma, independently,
    so a text's green count is Binomial(T, gamma) and the false-positive rate at z >= 4
    is that binomial's tail: 5.1e-5 for T = 199 (the normal approximation says 3.2e-5;
    the binomial is a little skewed). The sample checks the premise (green share, variance
    of the counts) and the tails at z >= 2.5, 3 and 4 against the binomial's. (Showing
    rate < 1e-4 from the count alone would need ~10x more streams: 13 in 200,000 is a
    rate of 6.5e-5, with a 95 % upper bound of 1.03e-4.)
    """
    rng = np.random.default_rng(3)
    n, length, chunk = 200_000, 200, 25_000
    t = length - 1
    greens = []
    for _ in range(n // chunk):
        streams = rng.integers(0, VOCAB, (chunk, length))
        # Random bigrams over 32,000 tokens repeat about once in 50,000 streams: scoring
        # every pair measures the same thing, twice as fast.
        greens.append(score_batch(PARAMS, streams, ignore_repeated_bigrams=False).green)
    green = np.concatenate(greens)
    gamma = PARAMS.gamma
    share = green.sum() / (n * t)
    assert abs(share - gamma) < 6 * math.sqrt(gamma * (1 - gamma) / (n * t))
    assert green.var() == pytest.approx(t * gamma * (1 - gamma), rel=0.02)  # independence

    z = (green - gamma * t) / math.sqrt(t * gamma * (1 - gamma))
    for threshold in (2.5, 3.0, PARAMS.z_threshold):
        k = math.ceil(gamma * t + threshold * math.sqrt(t * gamma * (1 - gamma)))
        rate = binomial_tail(t, k, gamma)
        observed = int((z >= threshold).sum())
        assert abs(observed - rate * n) < 4 * math.sqrt(rate * n) + 1, (threshold, observed)
    assert rate < 1e-4
    assert observed / n < 1e-4


# --- watermarked text --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def watermarked() -> np.ndarray:
    """200 sequences of 200 tokens sampled with delta = 2, gamma = 0.25 under PARAMS."""
    return sample(PARAMS, 200, 200, 1024, np.random.default_rng(4))


def test_watermarked_sequences_are_detected(watermarked: np.ndarray) -> None:
    scores = score_batch(PARAMS, watermarked)
    assert (scores.z_score >= PARAMS.z_threshold).mean() >= 0.99
    one = score(PARAMS, watermarked[0])
    assert one.watermarked and one.p_value < 1e-6
    assert one.green / one.scored > 0.5


def test_the_wrong_key_does_not_detect(watermarked: np.ndarray) -> None:
    wrong = WatermarkParams.from_secret(b"s" * 32, "k2")
    scores = score_batch(wrong, watermarked)
    # (No check of the z mean: the 200 samples share one model, so they share bigrams and
    # their z-scores under another key are correlated, not 200 independent draws.)
    assert not np.any(scores.z_score >= wrong.z_threshold)


def test_unwatermarked_samples_of_the_same_model_are_absent() -> None:
    plain = sample(None, 100, 200, 1024, np.random.default_rng(5))
    assert not np.any(score_batch(PARAMS, plain).z_score >= PARAMS.z_threshold)


def test_key_rotation_finds_the_key(watermarked: np.ndarray) -> None:
    keys = {
        "old": derive_key(b"o" * 32, "old"),
        "k1": PARAMS.key,
        "next": derive_key(b"n" * 32, "next"),
    }
    found = detect(keys, PARAMS, watermarked[1])
    assert found.key_id == "k1" and found.watermarked
    assert found.z_score == score(PARAMS, watermarked[1]).z_score
    # Unwatermarked: the best key is reported with a p-value corrected for three tries.
    plain = np.random.default_rng(6).integers(0, VOCAB, 200)
    best = detect(keys, PARAMS, plain)
    assert not best.watermarked
    each = {k: score(WatermarkParams(key=key), plain) for k, key in keys.items()}
    top = max(each, key=lambda k: each[k].z_score)
    assert best.key_id == top and best.z_score == each[top].z_score
    assert best.p_value == pytest.approx(min(1.0, 3 * each[top].p_value))
    with pytest.raises(ValueError):
        detect({}, PARAMS, plain)


def test_repeated_bigrams_are_counted_once() -> None:
    # Two tokens that are green after each other, repeated: "a b a b a b ...".
    prev = np.arange(1, 5000)
    mask = is_green(PARAMS, prev, prev + 1) & is_green(PARAMS, prev + 1, prev)
    a = int(prev[np.argmax(mask)])
    repetitive = np.array([a, a + 1] * 100)
    counted_each_time = score(PARAMS, repetitive, ignore_repeated_bigrams=False)
    assert counted_each_time.scored == 199 and counted_each_time.watermarked
    once = score(PARAMS, repetitive)
    assert (once.scored, once.green) == (2, 2)
    assert not once.watermarked
    batch = score_batch(PARAMS, repetitive[None, :])
    assert (batch.scored[0], batch.green[0]) == (2, 2)


def test_nothing_to_score() -> None:
    for ids in ([], [5]):
        found = score(PARAMS, np.array(ids, dtype=np.int64))
        assert (found.scored, found.z_score, found.p_value, found.watermarked) == (0, 0, 1, False)
    empty = np.array([], dtype=np.int64)
    assert score_pairs(PARAMS, empty, empty).scored == 0


@pytest.mark.parametrize("high", [2**16, 2**18 + 5, 2**32])
def test_scoring_counts_exactly_the_green_distinct_pairs(high: int) -> None:
    """The detector's fast paths (word table, sort-based dedup, single-key count) agree
    with the element-wise reference, for ids inside and beyond the word table."""
    rng = np.random.default_rng(high)
    ids = rng.integers(0, high, 300, dtype=np.uint64)
    ids[100:110] = ids[50:60]  # some repeated bigrams
    pairs = {(int(a), int(b)) for a, b in itertools.pairwise(ids)}
    prev = np.array([a for a, _ in pairs], dtype=np.uint64)
    tokens = np.array([b for _, b in pairs], dtype=np.uint64)
    keys = {"a": 11, "b": 2**63 + 5, "c": 99}
    for key in keys.values():
        params = WatermarkParams(key=key)
        expected = int(is_green(params, prev, tokens).sum())
        found = score(params, ids)
        assert (found.green, found.scored) == (expected, len(pairs))
    best = detect(keys, WatermarkParams(key=0), ids)
    greens = {k: int(is_green(WatermarkParams(key=v), prev, tokens).sum()) for k, v in keys.items()}
    assert best.green == max(greens.values()) and greens[best.key_id] == best.green
