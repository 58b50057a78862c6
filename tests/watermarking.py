"""Test helpers for the watermark: a random "model" that samples through the scheme's
reference biasing, and a tiny byte-level BPE tokenizer trained on made-up words.

No downloads: the tokenizer is trained here, on a corpus built from a seeded RNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from inference.watermark import WatermarkParams, bias_logits

SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "no", "dri", "po", "an", "est", "qui"]


def random_model(
    vocab: int, rng: np.random.Generator, sigma: float = 3.0, rows: int = 64
) -> npt.NDArray[np.float32]:
    """Logits for each previous token: a fixed random table, one row per ``prev % rows``.

    ``sigma`` sets how peaked the next-token distributions are (3: a few dozen tokens
    share most of the mass, much like a language model's); temperature 1.
    """
    return (rng.standard_normal((rows, vocab)) * sigma).astype(np.float32)


def sample(
    params: WatermarkParams | None,
    n: int,
    length: int,
    vocab: int,
    rng: np.random.Generator,
    *,
    allowed: npt.NDArray[np.int64] | None = None,
    sigma: float = 3.0,
) -> npt.NDArray[np.int64]:
    """``[n, length]`` token ids sampled from :func:`random_model`, watermarked with ``params``
    (None: no watermark). ``allowed`` restricts the model to those token ids."""
    table = random_model(vocab, rng, sigma)
    if allowed is not None:
        banned = np.ones(vocab, dtype=bool)
        banned[allowed] = False
        table[:, banned] = -np.inf
    rows = table.shape[0]
    prev = rng.choice(allowed, n) if allowed is not None else rng.integers(0, vocab, n)
    out = np.empty((n, length), dtype=np.int64)
    for i in range(length):
        logits = table[prev % rows]
        if params is not None:
            logits = bias_logits(params, logits, prev)
        # Gumbel-max: argmax(logits + Gumbel noise) is a sample from softmax(logits).
        prev = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        out[:, i] = prev
    return out


def corpus(rng: np.random.Generator, words: int = 600, sentences: int = 400) -> list[str]:
    """Sentences of made-up words (deterministic for a seeded ``rng``)."""
    lexicon = sorted({"".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(words)})
    lines = []
    for _ in range(sentences):
        chosen = rng.choice(lexicon, rng.integers(5, 15))
        lines.append(" ".join(chosen).capitalize() + ".")
    return lines


def build_tokenizer(directory: Path, vocab_size: int = 1200, seed: int = 7) -> Path:
    """Train a byte-level BPE on :func:`corpus` and save ``directory/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(np.random.default_rng(seed)), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
