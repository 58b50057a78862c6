"""Features of a key's traffic over trailing, tumbling windows, computed from request events.

A *window* is one API key's requests that finished in ``[start, start + window_s)``
(windows are aligned to the epoch and only exist when the key made requests). Every
feature uses that window and what came before it (the key's profile of earlier windows),
never a later one. Each feature belongs to one *cause family*, which is what an
explanation names; its scaling is chosen so that a typical shift is about one unit
(log for heavy-tailed sizes and times, shares in 0..1).

The features themselves are listed in :mod:`monitors.anomaly.catalog`. Events are
converted to compact rows once (:func:`event_row`: what the sink keeps and
stores), rows to columns (:class:`EventColumns`), and columns to one matrix of windows
(:meth:`FeatureBuilder.build`) with numpy: about a microsecond per event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitors.anomaly.catalog import (
    DIRECTION,
    FAMILIES,
    FAMILY_OF,
    FEATURES,
    INDEX,
    NAMES,
    TESTS,
    Family,
    Feature,
)
from monitors.anomaly.profiles import KeyProfiles
from monitors.request_event import RequestEvent

__all__ = [
    "DIRECTION",
    "FAMILIES",
    "FAMILY_OF",
    "FEATURES",
    "INDEX",
    "NAMES",
    "TESTS",
    "EventColumns",
    "Family",
    "Feature",
    "FeatureBuilder",
    "WindowBatch",
    "event_row",
]

ROW_FIELDS = (
    "key_id",
    "request_id",
    "model",
    "arrival_us",
    "end_us",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "duration_s",
    "ttft_s",
    "guard_blocks",
    "guard_flags",
    "guard_score",
    "watermark_absent",
    "repetition_rate",
)
"""One event as the detector keeps it: no payload, subject, address or user agent."""


def event_row(event: RequestEvent) -> tuple[Any, ...] | None:
    """The event as a row of :data:`ROW_FIELDS`, or None when it has no key (not scored)."""
    if event.key_id is None or event.kind == "api":
        return None
    blocks = flags = 0
    score = 0.0
    for verdict in event.guard_verdicts:
        if verdict.action == "block":
            blocks += 1
        elif verdict.action in ("flag", "redact"):
            flags += 1
        score = max(score, verdict.score)
    watermark = None if event.watermark is None else float(event.watermark == "absent")
    return (
        event.key_id,
        event.request_id,
        event.model_served or event.model or "",
        event.time_us,
        event.time_us + int(event.duration_s * 1_000_000),
        event.status,
        event.prompt_tokens,
        event.completion_tokens,
        event.duration_s,
        event.ttft_s,
        blocks,
        flags,
        score,
        watermark,
        event.repetition_rate,
    )


def _floats(values: Iterable[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass(slots=True)
class EventColumns:
    """Rows as numpy columns (missing numbers are NaN)."""

    key_id: np.ndarray
    request_id: np.ndarray
    model: np.ndarray
    arrival_us: np.ndarray
    end_us: np.ndarray
    status: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    duration_s: np.ndarray
    ttft_s: np.ndarray
    guard_blocks: np.ndarray
    guard_flags: np.ndarray
    guard_score: np.ndarray
    watermark_absent: np.ndarray
    repetition_rate: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]]) -> EventColumns:
        cols = list(zip(*rows, strict=True)) if rows else [()] * len(ROW_FIELDS)
        return cls(
            key_id=np.array(cols[0], dtype=object),
            request_id=np.array(cols[1], dtype=object),
            model=np.array(cols[2], dtype=object),
            arrival_us=np.array(cols[3], dtype=np.int64),
            end_us=np.array(cols[4], dtype=np.int64),
            status=np.array(cols[5], dtype=np.int64),
            prompt_tokens=_floats(cols[6]),
            completion_tokens=_floats(cols[7]),
            duration_s=_floats(cols[8]),
            ttft_s=_floats(cols[9]),
            guard_blocks=np.array(cols[10], dtype=np.int64),
            guard_flags=np.array(cols[11], dtype=np.int64),
            guard_score=_floats(cols[12]),
            watermark_absent=_floats(cols[13]),
            repetition_rate=_floats(cols[14]),
        )

    @classmethod
    def from_events(cls, events: Iterable[RequestEvent]) -> EventColumns:
        return cls.from_rows([r for r in map(event_row, events) if r is not None])

    def __len__(self) -> int:
        return len(self.end_us)

    def take(self, index: np.ndarray) -> EventColumns:
        return EventColumns(*(getattr(self, name)[index] for name in ROW_FIELDS))


@dataclass(slots=True)
class WindowBatch:
    """Key windows: one row of :data:`FEATURES` each (NaN where a value is missing)."""

    key_id: np.ndarray
    start_us: np.ndarray
    n: np.ndarray
    model: np.ndarray
    """The model most of the window's requests went to."""
    X: np.ndarray
    first: np.ndarray
    """Index in the batch's (sorted) events of each window's first event."""
    request_ids: np.ndarray
    """The batch's request ids, sorted by window: ``request_ids[first[i]:first[i]+n[i]]``."""
    hour: np.ndarray
    key_index: np.ndarray
    pair_window: np.ndarray
    pair_model: np.ndarray
    """(window, model index) for each model a window used (profile updates)."""

    def __len__(self) -> int:
        return len(self.start_us)

    def requests_of(self, i: int) -> list[str]:
        return [str(r) for r in self.request_ids[self.first[i] : self.first[i] + self.n[i]]]


def _group_median_max(
    values: np.ndarray, group: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Median and maximum of ``values`` per group, ignoring NaN (NaN for an empty group)."""
    ok = ~np.isnan(values)
    v, g = values[ok], group[ok]
    order = np.lexsort((v, g))
    v, g = v[order], g[order]
    counts = np.bincount(g, minlength=count)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    median = np.full(count, np.nan)
    peak = np.full(count, np.nan)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    median[has] = (v[lo] + v[hi]) / 2
    peak[has] = v[starts[has] + counts[has] - 1]
    return median, peak


def _group_mean(values: np.ndarray, group: np.ndarray, count: int) -> np.ndarray:
    ok = ~np.isnan(values)
    total = np.bincount(group[ok], weights=values[ok], minlength=count)
    n = np.bincount(group[ok], minlength=count)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


class FeatureBuilder:
    """Turns event columns into key-window features, using (and updating) key profiles."""

    def __init__(self, window_s: float, profiles: KeyProfiles | None = None) -> None:
        self.window_us = int(window_s * 1_000_000)
        self.profiles = profiles if profiles is not None else KeyProfiles()

    def build(self, cols: EventColumns) -> WindowBatch:
        """Features of every window with events in ``cols`` (windows should be complete)."""
        profiles = self.profiles
        start = (cols.end_us // self.window_us) * self.window_us
        keys, key_inv = np.unique(cols.key_id.astype(str), return_inverse=True)
        key_index = profiles.key_index(keys)[key_inv]
        pair, group = np.unique(np.stack([key_index, start]), axis=1, return_inverse=True)
        group = group.ravel()
        m = pair.shape[1]
        order = np.lexsort((cols.arrival_us, group))
        group = group[order]
        cols = cols.take(order)
        n = np.bincount(group, minlength=m)
        first = np.concatenate(([0], np.cumsum(n)[:-1]))
        X = np.full((m, len(FEATURES)), np.nan)
        w_start = pair[1]
        w_key = pair[0]
        hour = ((w_start // 3_600_000_000) % 24).astype(np.int64)

        X[:, INDEX["requests"]] = np.log1p(n)
        expected = profiles.expected_count(w_key, hour)
        X[:, INDEX["rate_change"]] = np.log((n + 1) / (expected + 1))
        gaps = np.diff(cols.arrival_us).astype(np.float64) / 1e6
        same = group[1:] == group[:-1]
        gap_group = group[1:][same]
        mean_gap = _group_mean(gaps[same], gap_group, m)
        sq = _group_mean(gaps[same] ** 2, gap_group, m)
        with np.errstate(invalid="ignore", divide="ignore"):
            cv = np.sqrt(np.maximum(sq - mean_gap**2, 0)) / np.maximum(mean_gap, 1e-3)
        regular = np.clip(1 - cv, 0, 1)
        X[:, INDEX["arrival_regularity"]] = np.where(n >= 4, regular, np.nan)

        for name, values in (
            ("prompt_tokens", np.log1p(cols.prompt_tokens)),
            ("completion_tokens", np.log1p(cols.completion_tokens)),
        ):
            median, peak = _group_median_max(values, group, m)
            X[:, INDEX[name]] = median
            X[:, INDEX[f"{name}_max"]] = peak
        ok = cols.status < 400
        duration = np.where(ok, cols.duration_s, np.nan)
        ttft = np.where(ok, cols.ttft_s, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            tps = cols.completion_tokens / np.maximum(duration - ttft, 1e-3)
        tps = np.where((cols.completion_tokens >= 2) & ok, tps, np.nan)
        for name, values in (("latency_s", duration), ("ttft_s", ttft), ("tokens_per_s", tps)):
            with np.errstate(invalid="ignore", divide="ignore"):
                logged = np.log(np.maximum(values, 1e-4))
            X[:, INDEX[name]] = _group_median_max(logged, group, m)[0]
        per = n + 1.0
        X[:, INDEX["upstream_error_share"]] = (
            np.bincount(group, weights=cols.status >= 500, minlength=m) / per
        )
        refused = (cols.status >= 400) & (cols.status < 500)
        X[:, INDEX["refusal_share"]] = np.bincount(group, weights=refused, minlength=m) / per
        blocked = cols.guard_blocks > 0
        flagged = (cols.guard_flags > 0) & ~blocked
        X[:, INDEX["guard_block_share"]] = np.bincount(group, weights=blocked, minlength=m) / per
        X[:, INDEX["guard_flag_share"]] = np.bincount(group, weights=flagged, minlength=m) / per
        X[:, INDEX["guard_score_max"]] = _group_median_max(cols.guard_score, group, m)[1]
        X[:, INDEX["repetition_rate"]] = _group_mean(cols.repetition_rate, group, m)
        scored = ~np.isnan(cols.watermark_absent)
        absent = np.bincount(group[scored], weights=cols.watermark_absent[scored], minlength=m)
        scored_n = np.bincount(group[scored], minlength=m)
        X[:, INDEX["watermark_absent_share"]] = np.where(scored_n > 0, absent / per, np.nan)

        surprise = profiles.hour_surprise(w_key, hour, w_start)
        X[:, INDEX["hour_surprise"]] = surprise
        hits = np.bincount(group, weights=blocked | flagged, minlength=m)
        trail = profiles.trail(w_key, w_start, n, expected, hits, surprise)
        X[:, INDEX["requests_trail"]] = np.log1p(trail.requests)
        X[:, INDEX["rate_trail"]] = np.log((trail.requests + 1) / (trail.expected + 1))
        X[:, INDEX["guard_hits_trail"]] = trail.hits / (trail.requests + 1)
        X[:, INDEX["hour_surprise_trail"]] = np.where(np.isnan(surprise), np.nan, trail.surprise)
        models, model_inv = np.unique(cols.model.astype(str), return_inverse=True)
        model_index = profiles.model_index(models)[model_inv]
        rare = profiles.rare_model(w_key[group], model_index)
        X[:, INDEX["rare_model_share"]] = np.bincount(group, weights=rare, minlength=m) / per
        pairs, pair_counts = np.unique(np.stack([group, model_index]), axis=1, return_counts=True)
        X[:, INDEX["distinct_models"]] = np.bincount(pairs[0], minlength=m)
        # The window's model: the one most of its requests went to.
        best = np.lexsort((-pair_counts, pairs[0]))
        firsts = np.concatenate(([True], pairs[0][best][1:] != pairs[0][best][:-1]))
        main_model = np.empty(m, dtype=object)
        main_model[pairs[0][best][firsts]] = profiles.model_names(pairs[1][best][firsts])

        return WindowBatch(
            key_id=np.array(profiles.key_names(w_key), dtype=object),
            start_us=w_start,
            n=n,
            model=main_model,
            X=X,
            first=first,
            request_ids=cols.request_id,
            hour=hour,
            key_index=w_key,
            pair_window=pairs[0],
            pair_model=pairs[1],
        )
