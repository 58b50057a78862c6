"""Each key's own history: when it is active, how busy its windows are, which models it uses.

The profile is what makes the rate and timing features relative to *this* key (a global
hour feature would flag every night-time key). It only ever holds windows before the one
being scored, is updated with windows that were not flagged (an attacker must not teach
it), and forgets with a half-life (default 14 days) so that a key's habits can change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_WINDOWS = 48
"""Windows of history before the hour and model features say anything (NaN before)."""
RARE_SHARE = 0.02
DAY_US = 86_400_000_000
TRAIL_HALF_LIFE_US = 120e6
"""The trailing features' memory: a window two minutes ago counts half (with five, a
large burst kept its key flagged for half an hour after it ended)."""


@dataclass(slots=True)
class Trail:
    """Exponentially decayed sums over each window's key's windows up to and including it."""

    requests: np.ndarray
    expected: np.ndarray
    hits: np.ndarray
    surprise: np.ndarray
    windows: np.ndarray


class KeyProfiles:
    def __init__(self, half_life_days: float = 14.0) -> None:
        self.half_life_us = half_life_days * 86_400e6
        self.keys: dict[str, int] = {}
        self.models: dict[str, int] = {}
        self.hour_windows = np.zeros((0, 24))
        self.hour_requests = np.zeros((0, 24))
        self.model_windows = np.zeros((0, 0))
        self.last_update_us: int | None = None
        self.first_us = np.zeros(0, dtype=np.int64)
        """When each key's profile got its first window (-1: not yet)."""
        self._trail = np.zeros((0, 6))
        """Per key: last window start (µs), requests, expected, hits, surprise, windows."""

    # -- indices -----------------------------------------------------------------------

    def key_index(self, names: Sequence[str]) -> np.ndarray:
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            index = self.keys.get(name)
            if index is None:
                index = self.keys[name] = len(self.keys)
            out[i] = index
        grow = len(self.keys) - self.hour_windows.shape[0]
        if grow > 0:
            self.hour_windows = np.vstack([self.hour_windows, np.zeros((grow, 24))])
            self.hour_requests = np.vstack([self.hour_requests, np.zeros((grow, 24))])
            self.model_windows = np.vstack(
                [self.model_windows, np.zeros((grow, self.model_windows.shape[1]))]
            )
            self._trail = np.vstack([self._trail, np.zeros((grow, 6))])
            self.first_us = np.concatenate([self.first_us, np.full(grow, -1, dtype=np.int64)])
            self._trail[-grow:, 0] = -1
        return out

    def model_index(self, names: Sequence[str]) -> np.ndarray:
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            index = self.models.get(name)
            if index is None:
                index = self.models[name] = len(self.models)
            out[i] = index
        grow = len(self.models) - self.model_windows.shape[1]
        if grow > 0:
            pad = np.zeros((self.model_windows.shape[0], grow))
            self.model_windows = np.hstack([self.model_windows, pad])
        return out

    def key_names(self, index: np.ndarray) -> list[str]:
        names = list(self.keys)
        return [names[i] for i in index]

    def model_names(self, index: np.ndarray) -> list[str]:
        names = list(self.models)
        return [names[i] for i in index]

    # -- features ----------------------------------------------------------------------

    def windows(self, key: np.ndarray) -> np.ndarray:
        return self.hour_windows[key].sum(axis=1)

    def expected_count(self, key: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """The key's mean requests per active window at this hour (its overall mean when
        the hour has too little history; NaN for a key without history)."""
        hw = self.hour_windows[key, hour]
        hr = self.hour_requests[key, hour]
        total_w = self.hour_windows[key].sum(axis=1)
        total_r = self.hour_requests[key].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            at_hour = hr / hw
            overall = total_r / total_w
        out = np.where(hw >= 3, at_hour, overall)
        return np.where(total_w >= 10, out, np.nan)

    def hour_surprise(self, key: np.ndarray, hour: np.ndarray, start: np.ndarray) -> np.ndarray:
        """How unusual this hour is for the key, in nats above its entropy; NaN until the
        key's profile has a day of history (before that every new hour looks odd)."""
        counts = self.hour_windows[key] + 0.5
        p = counts / counts.sum(axis=1, keepdims=True)
        entropy = -(p * np.log(p)).sum(axis=1)
        surprise = -np.log(p[np.arange(len(key)), hour]) - entropy
        first = self.first_us[key]
        known = (self.windows(key) >= MIN_WINDOWS) & (first >= 0) & (start - first >= DAY_US)
        return np.where(known, surprise, np.nan)

    def rare_model(self, key: np.ndarray, model: np.ndarray) -> np.ndarray:
        total = self.windows(key)
        share = self.model_windows[key, model] / np.maximum(total, 1)
        return ((share < RARE_SHARE) & (total >= MIN_WINDOWS)).astype(np.float64)

    def trail(
        self,
        key: np.ndarray,
        start: np.ndarray,
        n: np.ndarray,
        expected: np.ndarray,
        hits: np.ndarray,
        surprise: np.ndarray,
    ) -> Trail:
        """Decayed sums up to each window, in time order per key (windows must be sorted
        by key, then start). Recent behaviour, not learned habits: every window counts."""
        out = np.zeros((len(key), 5))
        exp = np.where(np.isnan(expected), n, expected)
        sur = np.where(np.isnan(surprise), 0.0, np.maximum(surprise, 0.0))
        state = self._trail
        for i in range(len(key)):
            k = key[i]
            row = state[k]
            t = start[i]
            if row[0] >= 0:
                factor = 0.5 ** ((t - row[0]) / TRAIL_HALF_LIFE_US)
                row[1:] *= factor
            row[0] = t
            row[1] += n[i]
            row[2] += exp[i]
            row[3] += hits[i]
            row[4] += sur[i]
            row[5] += 1.0
            out[i] = row[1:]
        return Trail(out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4])

    # -- learning ----------------------------------------------------------------------

    def update(self, batch: Any, keep: np.ndarray | None = None) -> None:
        """Add a scored :class:`~monitors.anomaly.features.WindowBatch`'s windows, except
        those not in ``keep`` (the flagged ones), after decaying what was there."""
        if len(batch) == 0:
            return
        now = int(batch.start_us.max())
        if self.last_update_us is not None and now > self.last_update_us:
            factor = 0.5 ** ((now - self.last_update_us) / self.half_life_us)
            self.hour_windows *= factor
            self.hour_requests *= factor
            self.model_windows *= factor
        self.last_update_us = max(now, self.last_update_us or now)
        keep = np.ones(len(batch), dtype=bool) if keep is None else keep
        k, h = batch.key_index[keep], batch.hour[keep]
        new = self.first_us[k] < 0
        self.first_us[k[new]] = batch.start_us[keep][new]
        np.add.at(self.hour_windows, (k, h), 1.0)
        np.add.at(self.hour_requests, (k, h), batch.n[keep].astype(np.float64))
        kept_pairs = keep[batch.pair_window]
        np.add.at(
            self.model_windows,
            (batch.key_index[batch.pair_window[kept_pairs]], batch.pair_model[kept_pairs]),
            1.0,
        )
