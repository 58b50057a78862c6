"""The detector: an Isolation Forest over key windows plus per-key robust baselines.

Why two parts: a forest looks at all features at once, so a shift in one of twenty
features is diluted (ROC-AUC 0.80 at +3sigma, measured in docs/anomaly.md), while a robust
z-score per feature against the key's own median and MAD catches exactly that; the forest
in turn catches combinations no single feature shows. The score is

    S = weight * s_forest + B

- ``s_forest = (mean_h - h(x)) / sd_h``: the forest's mean path length ``h`` (shorter =
  more isolated) standardised on the training windows. It is linear in ``h``, so SHAP's
  attributions of ``h`` become attributions of ``S`` exactly.
- ``B = max over families of (max over the family's features of the directed robust z)``
  (z against the key's median/MAD, the fleet's for keys without enough history; only the
  anomalous direction counts; capped at 30). Taking the family maximum is what keeps a
  single-cause incident from being diluted.

The threshold comes from an *alert budget* (flags per day per million requests): on the
training windows (assumed mostly clean; flagged windows are left out at each retraining)
the expected false flags per day must not exceed the budget. Where the budget asks for a
quantile beyond the data, the tail is extrapolated with an exponential fit to the top
1 % (peaks over threshold).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammainc, ndtri
from sklearn.ensemble import IsolationForest

from monitors.anomaly.calibration import FamilyCalibration
from monitors.anomaly.features import (
    DIRECTION,
    FAMILIES,
    FAMILY_OF,
    FEATURES,
    INDEX,
    TESTS,
    WindowBatch,
)
from monitors.anomaly.forest import FlatForest
from monitors.anomaly.profiles import KeyProfiles
from monitors.anomaly.trail import TRAILED, ZTrail

Z_CAP = 30.0
TWO_SIDED_TRAILED = DIRECTION[TRAILED] == 0
"""Trailed features anomalous in both directions (their combined z counts as |z|)."""
MIN_KEY_WINDOWS = 30
"""A key's own median/MAD is used once it has this many training windows."""
MAD_TO_SD = 1.4826
ABS_FLOOR = np.array(
    [{"share": 0.02, "log": 0.05, "log1p": 0.05, "raw": 0.05}[f.transform] for f in FEATURES]
)
"""Smallest scale per feature: a key whose windows never vary must not make noise huge."""
# The hour surprise is already relative to the key (nats above its entropy): one nat is
# one unit, however concentrated the key's hours are.
ABS_FLOOR[INDEX["hour_surprise"]] = 1.0
ABS_FLOOR[INDEX["hour_surprise_trail"]] = 1.0


@dataclass(slots=True)
class Baseline:
    """Per-key and fleet-wide medians and robust scales of every feature."""

    keys: dict[str, int]
    median: np.ndarray
    scale: np.ndarray
    fleet_median: np.ndarray
    fleet_scale: np.ndarray
    rate: np.ndarray
    """[keys, features]: events per request of the count features (a Poisson rate)."""
    fleet_rate: np.ndarray
    n_ref: np.ndarray
    """[keys]: the key's median requests per window (per-request features scale by it)."""
    fleet_n_ref: float

    @classmethod
    def fit(cls, key_id: np.ndarray, X: np.ndarray) -> Baseline:
        """Medians and scales per key; a feature a key never had (all NaN) gets the
        fleet's, and one nobody had gets 0 and the floor."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns, on purpose
            return cls._fit(key_id, X)

    @classmethod
    def _fit(cls, key_id: np.ndarray, X: np.ndarray) -> Baseline:
        fleet_median = np.nanmedian(X, axis=0)
        fleet_median = np.where(np.isnan(fleet_median), 0.0, fleet_median)
        fleet_mad = np.nanmedian(np.abs(X - fleet_median), axis=0)
        fleet_scale = np.maximum(np.nan_to_num(fleet_mad) * MAD_TO_SD, ABS_FLOOR)
        names, inverse = np.unique(key_id.astype(str), return_inverse=True)
        median = np.tile(fleet_median, (len(names), 1))
        scale = np.tile(fleet_scale, (len(names), 1))
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
        for k in range(len(names)):
            rows = X[order[bounds[k] : bounds[k + 1]]]
            if len(rows) < MIN_KEY_WINDOWS:
                continue
            med = np.nanmedian(rows, axis=0)
            mad = np.nanmedian(np.abs(rows - med), axis=0)
            known = ~np.isnan(med)
            median[k, known] = med[known]
            own = np.where(np.isnan(mad), fleet_scale, mad * MAD_TO_SD)
            # Half the fleet's spread at least: a key's quiet week is not its whole range.
            scale[k] = np.maximum(own, np.maximum(ABS_FLOOR, 0.5 * fleet_scale))
        # Counts of rare events: x = share * (n + 1) events in n requests.
        n = np.expm1(X[:, INDEX["requests"]])
        per_feature = np.where(
            TESTS == "count_trail", np.expm1(X[:, INDEX["requests_trail"]])[:, None], n[:, None]
        )
        counts = np.nan_to_num(X * (per_feature + 1))
        present = ~np.isnan(X)
        events = np.zeros((len(names), X.shape[1]))
        trials = np.zeros((len(names), X.shape[1]))
        np.add.at(events, inverse, counts)
        np.add.at(trials, inverse, present * per_feature)
        fleet_rate = (events.sum(axis=0) + 1.0) / (trials.sum(axis=0) + 100.0)
        prior = 200.0  # requests' worth of the fleet's rate: a quiet key is not certain
        rate = (events + prior * fleet_rate) / (trials + prior)
        n_ref = np.ones(len(names))
        for k in range(len(names)):
            n_ref[k] = max(np.median(n[order[bounds[k] : bounds[k + 1]]]), 1.0)
        return cls(
            {str(name): i for i, name in enumerate(names)},
            median,
            scale,
            fleet_median,
            fleet_scale,
            rate,
            fleet_rate,
            n_ref,
            float(max(np.median(n), 1.0)),
        )

    def index_of(self, key_id: np.ndarray) -> np.ndarray:
        return np.array([self.keys.get(str(k), -1) for k in key_id], dtype=np.int64)

    def rows_for(self, key_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The median and scale rows for each key (the fleet's for an unknown key)."""
        index = self.index_of(key_id)
        known = index >= 0
        median = np.where(known[:, None], self.median[np.maximum(index, 0)], self.fleet_median)
        scale = np.where(known[:, None], self.scale[np.maximum(index, 0)], self.fleet_scale)
        return median, scale

    def z(self, key_id: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Directed z of every feature (0 in the harmless direction), capped at Z_CAP; and
        the per-request features' signed z (for the trailing combination)."""
        index = self.index_of(key_id)
        known = index >= 0
        safe = np.maximum(index, 0)
        median = np.where(known[:, None], self.median[safe], self.fleet_median)
        scale = np.where(known[:, None], self.scale[safe], self.fleet_scale)
        n = np.maximum(np.expm1(X[:, INDEX["requests"]]), 1.0)
        n_ref = np.where(known, self.n_ref[safe], self.fleet_n_ref)
        # Medians of more requests than the key's usual window vary less, and of fewer more.
        shrink = np.clip(np.sqrt(n_ref / n), 0.33, 3.0)
        per_request = TESTS == "per_request"
        scale = np.where(per_request, scale * shrink[:, None], scale)
        z = (X - median) / scale
        oriented = np.where(DIRECTION < 0, -z, z)
        directed = np.where(DIRECTION == 0, np.abs(z), oriented)
        # The trail needs the sign even of a two-sided feature: |z| summed over a key's
        # recent windows only grows (Stouffer over 2-s windows put a normal key's
        # completion_tokens at z 10); its combination is made two-sided afterwards.
        signed = np.clip(np.nan_to_num(oriented[:, TRAILED]), -Z_CAP, Z_CAP)
        rates = np.where(known[:, None], self.rate[safe], self.fleet_rate)
        trail_n = np.expm1(X[:, INDEX["requests_trail"]])
        for test, trials in (("count", n), ("count_trail", trail_n)):
            count = test == TESTS
            events = X[:, count] * (trials + 1)[:, None]
            lam = rates[:, count] * trials[:, None]
            # One-sided Poisson tail P(X >= events) (gammainc extends it to decayed,
            # non-integer counts) turned into a normal z.
            tail = gammainc(np.maximum(events, 1e-9), np.maximum(lam, 1e-12))
            poisson_z = -ndtri(np.clip(tail, 1e-300, 1.0))
            directed[:, count] = np.where(events >= 0.5, poisson_z, 0.0)
        directed[:, TESTS == "forest_only"] = 0.0
        return np.clip(np.nan_to_num(directed), 0.0, Z_CAP), signed


@dataclass(slots=True)
class Scores:
    total: np.ndarray
    forest: np.ndarray
    """``weight * s_forest``."""
    baseline: np.ndarray
    """B: the largest family component."""
    families: np.ndarray
    """[windows, families]: each family's baseline component (calibrated z)."""
    raw_families: np.ndarray
    """[windows, families]: the largest directed z of each family's features."""
    baseline_feature: np.ndarray
    """[windows]: the feature credited with the baseline part."""
    z: np.ndarray
    """[windows, features]: directed robust z (0 in the normal direction)."""
    path_length: np.ndarray
    isolation: np.ndarray
    """The forest's own s(x) in 0..1 (``-score_samples``), for the score histogram."""
    X: np.ndarray
    """The imputed features that were scored."""
    usual: np.ndarray
    """The key's median of each feature."""


@dataclass(slots=True)
class AnomalyModel:
    """A trained detector: forest, baselines, calibration, threshold and key profiles."""

    forest: IsolationForest
    baseline: Baseline
    mean_h: float
    sd_h: float
    weight: float
    threshold: float
    profiles: KeyProfiles
    window_s: float
    trained_from_us: int = 0
    trained_to_us: int = 0
    rows: int = 0
    requests: int = 0
    version: int | None = None
    meta: dict[str, float] = field(default_factory=dict)
    flat: FlatForest | None = None
    calibration: FamilyCalibration | None = None

    def impute(self, key_id: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Missing values become the key's usual value (so they add nothing to any score)."""
        median, _ = self.baseline.rows_for(key_id)
        return np.where(np.isnan(X), median, X), median

    def path_length(self, X: np.ndarray) -> np.ndarray:
        """Mean path length over the trees (what SHAP's TreeExplainer attributes)."""
        if self.flat is None:
            self.flat = FlatForest(self.forest)
        return self.flat.path_length(X)

    def score(self, batch: WindowBatch, trail: ZTrail | None = None) -> Scores:
        """Score a batch; ``trail`` (the scorer's, kept across batches) adds the trailing
        per-request z."""
        X, usual = self.impute(batch.key_id, batch.X)
        return self.score_matrix(batch.key_id, X, usual, trail, batch.start_us)

    def score_matrix(
        self,
        key_id: np.ndarray,
        X: np.ndarray,
        usual: np.ndarray,
        trail: ZTrail | None = None,
        start_us: np.ndarray | None = None,
    ) -> Scores:
        directed, signed = self.baseline.z(key_id, X)
        if trail is not None and start_us is not None:
            combined = trail.combine(key_id, start_us, signed)
            combined = np.where(TWO_SIDED_TRAILED, np.abs(combined), combined)
            combined = np.clip(combined, 0.0, Z_CAP)
            directed[:, TRAILED] = np.maximum(directed[:, TRAILED], combined)
        raw = np.zeros((len(X), len(FAMILIES)))
        for f in range(len(FAMILIES)):
            raw[:, f] = directed[:, f == FAMILY_OF].max(axis=1)
        families = raw if self.calibration is None else self.calibration.z(raw)
        baseline = families.max(axis=1)
        # The feature that set the winning family's score gets the baseline's part.
        in_family = FAMILY_OF[None, :] == families.argmax(axis=1)[:, None]
        feature = np.where(in_family, directed, -1.0).argmax(axis=1)
        h = self.path_length(X)
        forest = self.weight * (self.mean_h - h) / self.sd_h
        c = _average_path_length(self.forest.max_samples_)
        return Scores(
            total=forest + baseline,
            forest=forest,
            baseline=baseline,
            families=families,
            raw_families=raw,
            baseline_feature=feature,
            z=directed,
            path_length=h,
            isolation=2.0 ** (-h / c),
            X=X,
            usual=usual,
        )

    def flagged(self, scores: Scores) -> np.ndarray:
        return scores.total >= self.threshold


def _average_path_length(n: float) -> float:
    """c(n): the mean path length of an unsuccessful search in a binary search tree."""
    if n <= 1:
        return 1.0
    if n == 2:
        return 1.0
    return float(2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n)


def budget_threshold(
    scores: np.ndarray, span_days: float, requests: int, budget_per_million: float
) -> float:
    """The score above which, on these (clean) windows, flags stay within the budget."""
    scores = np.sort(scores)
    n = len(scores)
    allowed_per_day = budget_per_million * requests / max(span_days, 1e-9) / 1e6
    windows_per_day = n / max(span_days, 1e-9)
    q = min(allowed_per_day / max(windows_per_day, 1e-9), 0.5)
    if q * n >= 20:
        return float(np.quantile(scores, 1 - q))
    # Beyond the data: the score is mostly calibrated normal z (families) plus a
    # standardised path length, so its tail is Gaussian-like: S²/2 has an exponential
    # tail. Fitted over the top 1 % (at least 20 windows): P(Y > u + y) = p_u e^(-y/β).
    top = max(20, n // 100)
    y = np.maximum(scores, 0.0) ** 2 / 2
    u = y[-top - 1] if n > top else y[0]
    beta = max(float((y[-top:] - u).mean()), 1e-6)
    p_u = top / n
    return float(np.sqrt(2 * (u + beta * np.log(p_u / max(q, 1e-12)))))


def fit_model(
    batch_key: np.ndarray,
    X: np.ndarray,
    *,
    start_us: np.ndarray,
    profiles: KeyProfiles,
    window_s: float,
    span_days: float,
    requests: int,
    budget_per_million: float,
    weight: float = 1.0,
    trees: int = 200,
    max_samples: int = 256,
    seed: int = 0,
) -> AnomalyModel:
    """Train on clean windows: baselines, forest, calibration, the budget's threshold."""
    baseline = Baseline.fit(batch_key, X)
    median, _ = baseline.rows_for(batch_key)
    filled = np.where(np.isnan(X), median, X)
    forest = IsolationForest(
        n_estimators=trees, max_samples=min(max_samples, len(X)), random_state=seed
    ).fit(filled)
    model = AnomalyModel(
        forest=forest,
        baseline=baseline,
        mean_h=0.0,
        sd_h=1.0,
        weight=weight,
        threshold=np.inf,
        profiles=profiles,
        window_s=window_s,
        rows=len(X),
        requests=requests,
    )
    h = model.path_length(filled)
    model.mean_h = float(h.mean())
    model.sd_h = float(max(h.std(), 1e-6))
    # Scored as live windows are: in time order per key, with the trailing z; first raw,
    # to calibrate the families, then calibrated, to set the threshold.
    raw = model.score_matrix(batch_key, filled, median, ZTrail(), start_us).raw_families
    model.calibration = FamilyCalibration.fit(raw)
    total = model.score_matrix(batch_key, filled, median, ZTrail(), start_us).total
    model.threshold = budget_threshold(total, span_days, requests, budget_per_million)
    return model
