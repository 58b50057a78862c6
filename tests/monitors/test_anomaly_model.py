"""Training, the alert budget, persistence (MAC-checked) and reload, retraining without
flagged windows, SHAP additivity and the flat forest against scikit-learn."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from sqlalchemy import Engine, update

from monitors.anomaly import store
from monitors.anomaly.detector import ZTrail, budget_threshold, fit_model
from monitors.anomaly.explain import Explainer
from monitors.anomaly.features import FAMILIES, INDEX, EventColumns, FeatureBuilder, event_row
from monitors.anomaly.forest import FlatForest, average_path_length
from monitors.anomaly.profiles import KeyProfiles
from monitors.anomaly.schema import models, windows
from monitors.anomaly.scorer import AnomalyScorer, detector_status
from monitors.anomaly.settings import AnomalySettings
from tests.monitors.anomaly_db import anomaly_engine  # noqa: F401
from tests.monitors.anomaly_traffic import START_US, traffic

MAC_KEY = bytes(range(32))


@pytest.fixture(scope="module")
def trained() -> tuple:
    rng = np.random.default_rng(0)
    builder = FeatureBuilder(10, KeyProfiles())
    batches = []
    for n in range(12):
        batch = builder.build(
            EventColumns.from_events(traffic(rng, START_US + n * 600_000_000, 600))
        )
        builder.profiles.update(batch)
        batches.append(batch)
    keys = np.concatenate([b.key_id for b in batches])
    X = np.concatenate([b.X for b in batches])
    starts = np.concatenate([b.start_us for b in batches])
    model = fit_model(
        keys,
        X,
        start_us=starts,
        profiles=builder.profiles,
        window_s=10,
        span_days=2 / 24,
        requests=int(sum(b.n.sum() for b in batches)),
        budget_per_million=50,
        trees=100,
    )
    stuffed = builder.build(
        EventColumns.from_events(
            traffic(rng, START_US + 7_200_000_000, 120, prompt_factor={"key-a": 30.0})
        )
    )
    return model, builder, stuffed


def test_budget_threshold_flags_at_most_the_budget() -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(100_000)
    # 1 day, 10M requests, 100 per million: 1,000 of the 100,000 windows.
    t = budget_threshold(scores, 1.0, 10_000_000, 100.0)
    assert abs((scores >= t).sum() - 1000) <= 5
    # Beyond the data: extrapolated, above the largest score seen.
    assert budget_threshold(scores, 1.0, 10_000, 1.0) > scores.max()


def test_incident_scores_above_threshold_and_normal_below(trained: tuple) -> None:
    model, _, stuffed = trained
    scores = model.score(stuffed, ZTrail())
    a = stuffed.key_id == "key-a"
    assert model.flagged(scores)[a].mean() >= 0.8
    assert not model.flagged(scores)[~a].any()
    assert (scores.families[a].argmax(axis=1) == FAMILIES.index("size")).all()


def test_flat_forest_matches_scikit_learn(trained: tuple) -> None:
    model, _, stuffed = trained
    X, _ = model.impute(stuffed.key_id, stuffed.X)
    h = FlatForest(model.forest).path_length(X)
    c = average_path_length(np.array([float(model.forest.max_samples_)]))[0]
    assert np.allclose(-(2.0 ** (-h / c)), model.forest.score_samples(X), atol=1e-12)


def test_attributions_add_up(trained: tuple) -> None:
    model, _, stuffed = trained
    scores = model.score(stuffed, ZTrail())
    explainer = Explainer(model)
    rows = np.arange(len(stuffed))
    attribution = explainer.attribute(scores, rows)
    # SHAP on the forest: sum(phi) + expected value is the mean path length...
    phi = np.asarray(explainer.tree.shap_values(scores.X))
    assert np.abs(phi.sum(axis=1) + explainer.expected - scores.path_length).max() < 1e-6
    # ...so the forest's part and the whole score are reproduced exactly.
    assert np.abs(attribution.forest.sum(axis=1) + attribution.base - scores.forest).max() < 1e-6
    total = attribution.contributions.sum(axis=1) + attribution.base
    assert np.abs(total - scores.total).max() < 1e-6
    flagged = np.flatnonzero(model.flagged(scores))
    explanation = explainer.explain(scores, flagged[:1])[0]
    assert explanation["family"] == "size"
    top = explanation["features"][0]
    assert top["name"].startswith("prompt_tokens") and "(usual " in top["text"]
    assert explanation["baseline"]["share"] + explanation["forest"]["share"] == pytest.approx(1)


def test_persist_reload_refuse_tampered(trained: tuple, anomaly_engine: Engine) -> None:  # noqa: F811
    model, _, stuffed = trained
    model = copy.deepcopy(model)
    version = store.save_model(anomaly_engine, model, MAC_KEY, START_US)
    loaded = store.load_latest_model(anomaly_engine, MAC_KEY)
    assert loaded is not None and loaded.version == version
    assert np.allclose(loaded.score(stuffed).total, model.score(stuffed).total)
    with pytest.raises(store.ModelRefused):
        store.load_latest_model(anomaly_engine, b"another key" * 3)
    with anomaly_engine.begin() as connection:
        connection.execute(update(models).values(blob=b"\x80\x04K\x01."))
    with pytest.raises(store.ModelRefused):
        store.load_latest_model(anomaly_engine, MAC_KEY)


def test_retraining_skips_flagged_windows(anomaly_engine: Engine) -> None:  # noqa: F811
    settings = AnomalySettings(
        window_s=10, min_windows=100, min_history_s=600, trees=20, retrain_interval_s=600
    )
    now = [START_US]
    scorer = AnomalyScorer(anomaly_engine, settings, MAC_KEY, clock=lambda: now[0])
    rng = np.random.default_rng(5)
    assert detector_status(anomaly_engine, settings)["state"] == "cold_start"
    versions = []
    for n in range(5):
        store.insert_events(
            anomaly_engine,
            [r for e in traffic(rng, START_US + n * 600_000_000, 600) if (r := event_row(e))],
        )
        now[0] = START_US + (n + 1) * 600_000_000 + 2_000_000
        result = scorer.tick()
        if result.trained:
            versions.append(result.trained)
    assert len(versions) >= 2 and versions == sorted(versions)
    state = detector_status(anomaly_engine, settings)
    assert state["state"] == "active" and state["model_version"] == versions[-1]
    # A flagged window is left out of the next training set.
    data = store.training_windows(anomaly_engine, 0)
    with anomaly_engine.begin() as connection:
        connection.execute(update(windows).where(windows.c.key_id == "key-a").values(flagged=True))
    after = store.training_windows(anomaly_engine, 0)
    assert len(after.X) == len(data.X) - int((data.key_id == "key-a").sum())
    assert "key-a" not in set(after.key_id)
    assert after.X.shape[1] == len(INDEX)
