"""Putting the cause families on one scale: each family's baseline score as a tail z.

The families' raw scores are maxima of robust z-scores with very different tails: a
latency median or a repetition mean has heavier tails than a Gaussian (a z of 8 is not
rare for them), while the Poisson tests of guard hits are calibrated z-scores already
(8 is astronomically rare). Taking the maximum over raw families would let the heavy
ones set the threshold and hide the others. So each family's score is mapped through
its own training distribution to a tail probability ``p = P(score >= x)`` (empirical
up to its top 1 %, an exponential tail fitted there beyond) and back to a normal z,
``-Φ⁻¹(p)``: a calibrated 5 means "one window in 3.5 million" for every family alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

GRID = 64
Z_CAP = 30.0


@dataclass(slots=True)
class FamilyCalibration:
    values: np.ndarray
    """[families, GRID]: each family's score at the tail probabilities ``log_p``."""
    log_p: np.ndarray
    """[GRID]: ln of the tail probabilities, from ln(0.5) down to the top 1 %."""
    beta: np.ndarray
    """[families]: the exponential tail's scale beyond the last grid point."""

    @classmethod
    def fit(cls, scores: np.ndarray) -> FamilyCalibration:
        n, families = scores.shape
        top = max(20, n // 100)
        log_p = np.linspace(np.log(0.5), np.log(top / n), GRID)
        values = np.zeros((families, GRID))
        beta = np.ones(families)
        for f in range(families):
            column = np.sort(scores[:, f])
            grid = np.quantile(column, 1 - np.exp(log_p))
            # Strictly increasing, so interpolation is defined where many scores tie at 0.
            values[f] = np.maximum.accumulate(grid + np.arange(GRID) * 1e-9)
            excess = column[-top:] - grid[-1]
            beta[f] = max(float(excess[excess > 0].mean()) if (excess > 0).any() else 0.1, 1e-3)
        return cls(values, log_p, beta)

    def z(self, scores: np.ndarray) -> np.ndarray:
        """[windows, families] raw family scores -> calibrated z (0 at or below the median)."""
        out = np.zeros_like(scores, dtype=np.float64)
        for f in range(scores.shape[1]):
            x = scores[:, f]
            last = self.values[f, -1]
            log_p = np.interp(x, self.values[f], self.log_p)
            beyond = x > last
            log_p[beyond] = self.log_p[-1] - (x[beyond] - last) / self.beta[f]
            p = np.exp(np.maximum(log_p, -690.0))
            out[:, f] = np.clip(-ndtri(np.clip(p, 1e-300, 0.5)), 0.0, Z_CAP)
        return out
