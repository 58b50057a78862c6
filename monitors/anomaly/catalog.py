"""The features: names, cause families, directions, scaling and how the baseline judges
each one (docs/anomaly.md has the same table; a test keeps the two in step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

FAMILIES = ("volume", "size", "latency", "safety", "quality", "timing")
Family = Literal["volume", "size", "latency", "safety", "quality", "timing"]
Transform = Literal["log1p", "log", "share", "raw"]
Test = Literal["robust", "per_request", "count", "count_trail", "forest_only"]


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    family: Family
    direction: int
    """+1: only high values are anomalous, -1: only low ones, 0: both."""
    transform: Transform
    """How the raw value was scaled (:meth:`display` undoes it for people)."""
    doc: str
    test: Test = "robust"
    """How the per-key baseline judges it (detector.py): robust z over the key's windows,
    the same scaled by the window's size (medians of per-request values), a Poisson tail
    for counts of rare events (shares of ``n + 1``), or left to the forest alone."""

    def display(self, value: float) -> str:
        if value is None or not math.isfinite(value):
            return "n/a"
        if self.transform == "log1p":
            raw = math.expm1(value)
        elif self.transform == "log":
            raw = math.exp(value)
        elif self.transform == "share":
            return f"{100 * value:.0f}%"
        else:
            raw = value
        if abs(raw) >= 100:
            return f"{raw:,.0f}"
        return f"{raw:.3g}"


FEATURES: tuple[Feature, ...] = (
    Feature("requests", "volume", 1, "log1p", "requests in the window", "forest_only"),
    Feature(
        "rate_change",
        "volume",
        1,
        "raw",
        "log((requests+1)/(usual+1)), usual = the key's mean per active window at this hour",
    ),
    Feature(
        "requests_trail",
        "volume",
        1,
        "log1p",
        "requests in the key's trailing minutes (exponentially decayed, half-life 2 min)",
        "forest_only",
    ),
    Feature(
        "rate_trail",
        "volume",
        1,
        "raw",
        "log((trailing requests+1)/(trailing usual+1)): a sustained rise, even a slow one",
    ),
    Feature(
        "arrival_regularity",
        "volume",
        1,
        "raw",
        "1 - coefficient of variation of inter-arrival times, in 0..1 (scripts are regular)",
    ),
    Feature("prompt_tokens", "size", 1, "log1p", "median prompt tokens", "per_request"),
    Feature("prompt_tokens_max", "size", 1, "log1p", "largest prompt in the window", "forest_only"),
    Feature("completion_tokens", "size", 0, "log1p", "median completion tokens", "per_request"),
    Feature(
        "completion_tokens_max",
        "size",
        1,
        "log1p",
        "largest completion in the window",
        "forest_only",
    ),
    Feature("latency_s", "latency", 1, "log", "median request duration", "per_request"),
    Feature("ttft_s", "latency", 1, "log", "median time to first token", "per_request"),
    Feature(
        "tokens_per_s",
        "latency",
        -1,
        "log",
        "median output tokens per second after TTFT",
        "per_request",
    ),
    Feature("upstream_error_share", "latency", 1, "share", "5xx answers / (requests + 1)", "count"),
    Feature(
        "guard_block_share", "safety", 1, "share", "requests a guard blocked / (n + 1)", "count"
    ),
    Feature(
        "guard_flag_share", "safety", 1, "share", "requests a guard flagged / (n + 1)", "count"
    ),
    Feature(
        "guard_score_max", "safety", 1, "raw", "highest guard score in the window", "forest_only"
    ),
    Feature(
        "refusal_share", "safety", 1, "share", "4xx answers (refusals) / (requests + 1)", "count"
    ),
    Feature(
        "guard_hits_trail",
        "safety",
        1,
        "share",
        "guard flags and blocks / (requests + 1) over the key's trailing minutes",
        "count_trail",
    ),
    Feature(
        "repetition_rate",
        "quality",
        1,
        "share",
        "mean repeated-4-gram share of answers",
        "per_request",
    ),
    Feature(
        "watermark_absent_share",
        "quality",
        1,
        "share",
        "answers without the watermark / (requests + 1)",
        "count",
    ),
    Feature(
        "hour_surprise",
        "timing",
        1,
        "raw",
        "-log p(hour | the key's past windows) minus the key's entropy (0 = as usual)",
    ),
    Feature(
        "hour_surprise_trail",
        "timing",
        1,
        "raw",
        "decayed sum of the key's recent windows' positive hour surprise: dense use at odd "
        "hours (a stolen key) adds up, a cron job's lone window does not",
    ),
    Feature(
        "rare_model_share",
        "timing",
        1,
        "share",
        "requests to models the key rarely used before (< 2 % of its windows) / (n + 1)",
        "count",
    ),
    Feature("distinct_models", "timing", 1, "raw", "models used in the window", "forest_only"),
)
NAMES = tuple(f.name for f in FEATURES)
INDEX = {name: i for i, name in enumerate(NAMES)}
FAMILY_OF = np.array([FAMILIES.index(f.family) for f in FEATURES])
DIRECTION = np.array([f.direction for f in FEATURES], dtype=np.float64)
TESTS = np.array([f.test for f in FEATURES])
