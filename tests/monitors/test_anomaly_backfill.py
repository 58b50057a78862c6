"""Two faults the gateway end-to-end test found (tests/monitors/test_anomaly_gateway.py):

- a scorer's first tick (or a takeover after a gap) reads up to an hour of events; built
  as one batch, every window was compared with the key profiles as they were before it
  (empty on a first start): the rate features were missing from all those windows, the
  model trained on them took any busier live window for a volume anomaly;
- a two-sided feature (completion_tokens) went into the trailing combination as |z|,
  which only grows: over 2-s windows a normal key's trailed z reached 10.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import Engine

from monitors.anomaly import store
from monitors.anomaly.detector import Baseline
from monitors.anomaly.features import FEATURES, INDEX, event_row
from monitors.anomaly.scorer import AnomalyScorer
from monitors.anomaly.settings import AnomalySettings
from monitors.anomaly.trail import TRAILED, ZTrail
from tests.monitors.anomaly_db import anomaly_engine  # noqa: F401
from tests.monitors.anomaly_traffic import START_US, traffic

SETTINGS = AnomalySettings(window_s=10, grace_s=1, min_history_s=86_400, min_windows=10)


def test_a_backfill_is_scored_in_time_order(anomaly_engine: Engine) -> None:  # noqa: F811
    hour_us = 3_600_000_000
    events = traffic(np.random.default_rng(3), START_US, 3600)
    store.insert_events(anomaly_engine, [event_row(e) for e in events])
    now = START_US + hour_us + 2_000_000
    scorer = AnomalyScorer(anomaly_engine, SETTINGS, b"k" * 32, clock=lambda: now)
    result = scorer.tick()
    assert result.held and result.windows > 600 and not result.flags  # cold start
    data = store.training_windows(anomaly_engine, 0)
    assert len(data.X) == result.windows
    known = ~np.isnan(data.X[:, INDEX["rate_change"]])
    # Only the first part of the hour finds the profiles cold.
    assert known.mean() > 0.9, known.mean()
    assert not known[data.start_us == data.start_us.min()].any()


def test_a_two_sided_feature_keeps_its_sign_in_the_trail() -> None:
    rng = np.random.default_rng(5)
    n, features = 3000, len(FEATURES)
    X = rng.normal(1.0, 0.3, (n, features))
    X[:, INDEX["requests"]] = np.log1p(3)
    keys = np.array(["key-a"] * n, dtype=object)
    baseline = Baseline.fit(keys, X)
    _, signed = baseline.z(keys, X)
    column = list(np.flatnonzero(TRAILED)).index(INDEX["completion_tokens"])
    assert (signed[:, column] < -0.5).any() and (signed[:, column] > 0.5).any()
    # Over 2-s windows (60 per half-life) a normal key's combination stays near N(0, 1).
    combined = ZTrail().combine(keys, START_US + np.arange(n) * 2_000_000, signed)
    assert np.abs(combined[500:, column]).max() < 5, np.abs(combined[500:, column]).max()
