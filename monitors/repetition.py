"""Output repetition: the share of an answer's word n-grams that repeat an earlier one.

A degenerating model loops ("the the the", the same sentence again and again); the
share of repeated 4-grams rises towards 1 while ordinary prose stays low (a few per
cent). It feeds the ``bastion_output_repetition_ratio`` histogram, the alert on a rate
above 15 % and the anomaly detector's quality family.
"""

from __future__ import annotations

from collections.abc import Iterable

N = 4
MIN_NGRAMS = 8
"""Shorter answers have no meaningful rate (a two-word answer repeats nothing)."""


def repetition_rate(texts: Iterable[str], n: int = N) -> float | None:
    """Repeated n-grams over all n-grams of the texts (each scored on its own), or None."""
    total = repeated = 0
    for text in texts:
        words = text.lower().split()
        seen: set[tuple[str, ...]] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            total += 1
            if gram in seen:
                repeated += 1
            else:
                seen.add(gram)
    if total < MIN_NGRAMS:
        return None
    return repeated / total
