"""Each key's recent per-request z-scores, combined over its trailing windows."""

from __future__ import annotations

import numpy as np

from monitors.anomaly.catalog import NAMES, TESTS

TRAILED = (TESTS == "per_request") | (np.array(NAMES) == "rate_change")
"""Features whose z is also combined over the key's recent windows (:class:`ZTrail`):
the per-request medians and means, and the rate against the key's usual."""
TRAIL_HALF_LIFE_US = 120e6


class ZTrail:
    """Each key's recent per-request z, combined over its trailing windows (Stouffer).

    A shift of ksigma per request moves one window's median by about k/1.25·√n sigma of the
    median: a key with two requests a window hides a 3sigma shift in its noise. Combining the
    key's recent windows, ``Σ w_i z_i / sqrt(Σ w_i²)`` with weights halving every two
    minutes, keeps a normal key near N(0, 1) while a sustained shift grows with the
    number of windows it lasts. Only earlier windows and the current one are used."""

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}
        self.state = np.zeros((0, 2 + int(TRAILED.sum())))
        """Per key: last window start, Σw², then Σw·z per feature."""

    def combine(self, key_id: np.ndarray, start: np.ndarray, signed: np.ndarray) -> np.ndarray:
        index = np.empty(len(key_id), dtype=np.int64)
        for i, key in enumerate(key_id):
            found = self.keys.get(str(key))
            if found is None:
                found = self.keys[str(key)] = len(self.keys)
            index[i] = found
        grow = len(self.keys) - len(self.state)
        if grow > 0:
            fresh = np.zeros((grow, self.state.shape[1]))
            fresh[:, 0] = -1
            self.state = np.vstack([self.state, fresh])
        out = np.zeros_like(signed)
        state = self.state
        for i in np.lexsort((start, index)):
            row = state[index[i]]
            if row[0] >= 0:
                factor = 0.5 ** ((start[i] - row[0]) / TRAIL_HALF_LIFE_US)
                row[1] *= factor * factor
                row[2:] *= factor
            row[0] = start[i]
            row[1] += 1.0
            row[2:] += signed[i]
            out[i] = row[2:] / np.sqrt(row[1])
        return out
