"""Features from request events: windows by end time, per-request aggregates, shares,
missing values, the key's own history (trailing only), what is left out."""

from __future__ import annotations

import math

import numpy as np

from monitors.anomaly.features import (
    FAMILIES,
    FEATURES,
    INDEX,
    EventColumns,
    FeatureBuilder,
    event_row,
)
from monitors.anomaly.profiles import KeyProfiles
from monitors.request_event import GuardVerdict, RequestEvent
from tests.monitors.anomaly_traffic import START_US, traffic

W = 30_000_000


def event(t_s: float, key: str = "k1", **fields: object) -> RequestEvent:
    base = dict(
        time_us=START_US + int(t_s * 1e6),
        request_id=f"r{t_s}",
        route="/v1/chat/completions",
        key_id=key,
        model="m1",
        status=200,
        prompt_tokens=100,
        completion_tokens=50,
        duration_s=1.0,
        ttft_s=0.2,
        watermark="watermarked",
        repetition_rate=0.01,
    )
    base.update(fields)
    return RequestEvent(**base)  # type: ignore[arg-type]


def test_every_feature_is_documented_in_a_family() -> None:
    assert {f.family for f in FEATURES} == set(FAMILIES)
    assert all(f.doc and f.direction in (-1, 0, 1) for f in FEATURES)
    assert FEATURES[INDEX["prompt_tokens"]].display(math.log1p(3900)) == "3,900"


def test_window_aggregates() -> None:
    events = [
        event(1, prompt_tokens=100),
        event(2, prompt_tokens=300, guard_verdicts=[GuardVerdict("inj", "input", "flag", 0.8)]),
        event(
            3,
            prompt_tokens=200,
            status=400,
            completion_tokens=None,
            guard_verdicts=[GuardVerdict("inj", "input", "block", 0.9)],
        ),
        event(4, prompt_tokens=10_000, duration_s=40.0),  # ends in the next window
        event(5, key="k2", watermark="absent", repetition_rate=None, ttft_s=None),
        event(6, key=None),  # not scored: no key
        event(7, kind="api"),  # not a model call
    ]
    batch = FeatureBuilder(30, KeyProfiles()).build(EventColumns.from_events(events))
    rows = {
        (k, int(s)): i for i, (k, s) in enumerate(zip(batch.key_id, batch.start_us, strict=True))
    }
    assert set(rows) == {("k1", START_US), ("k1", START_US + W), ("k2", START_US)}
    first = batch.X[rows[("k1", START_US)]]
    assert batch.n[rows[("k1", START_US)]] == 3
    assert first[INDEX["prompt_tokens"]] == np.log1p(200)
    assert first[INDEX["prompt_tokens_max"]] == np.log1p(300)
    assert first[INDEX["guard_flag_share"]] == 1 / 4 and first[INDEX["guard_block_share"]] == 1 / 4
    assert first[INDEX["refusal_share"]] == 1 / 4 and first[INDEX["guard_score_max"]] == 0.9
    # The refused request has no latency: the medians are of the two answered ones.
    assert np.isclose(first[INDEX["latency_s"]], 0.0)
    assert np.isclose(first[INDEX["tokens_per_s"]], np.log(50 / 0.8))
    assert first[INDEX["watermark_absent_share"]] == 0
    assert set(batch.requests_of(rows[("k1", START_US)])) == {"r1", "r2", "r3"}
    other = batch.X[rows[("k2", START_US)]]
    assert other[INDEX["watermark_absent_share"]] == 1 / 2
    assert np.isnan(other[INDEX["repetition_rate"]]) and np.isnan(other[INDEX["ttft_s"]])
    # A key without history: the features relative to its own past are missing, not 0.
    assert np.isnan(other[INDEX["rate_change"]]) and np.isnan(other[INDEX["hour_surprise"]])
    assert event_row(event(8, key=None)) is None


def test_history_is_trailing_and_the_key_own() -> None:
    rng = np.random.default_rng(3)
    builder = FeatureBuilder(30, KeyProfiles())
    day_us = 86_400_000_000
    # Two days of key-a..c active between 00:00 and 02:00 only.
    for day in range(2):
        for hour in (0, 1):
            start = START_US + day * day_us + hour * 3_600_000_000
            batch = builder.build(EventColumns.from_events(traffic(rng, start, 3600)))
            builder.profiles.update(batch)
    usual = builder.build(EventColumns.from_events(traffic(rng, START_US + 2 * day_us, 300)))
    odd = builder.build(
        EventColumns.from_events(traffic(rng, START_US + 2 * day_us + 12 * 3_600_000_000, 300))
    )
    assert np.nanmax(usual.X[:, INDEX["hour_surprise"]]) < 0.5
    assert np.nanmin(odd.X[:, INDEX["hour_surprise"]]) > 3.0
    assert np.all(np.abs(usual.X[:, INDEX["rate_change"]]) < 2.0)
    # Building does not learn: the profile only changes through update().
    before = builder.profiles.hour_windows.copy()
    builder.build(EventColumns.from_events(traffic(rng, START_US + 3 * day_us, 60)))
    assert np.array_equal(before, builder.profiles.hour_windows)


def test_docs_name_every_feature() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "anomaly.md").read_text()
    for feature in FEATURES:
        assert f"| `{feature.name}` | {feature.family} |" in text, feature.name
