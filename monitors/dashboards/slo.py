"""The service-level objectives and alert bounds that dashboards and rules share.

One frozen settings object feeds both the SLO panels (error budget left) and the
burn-rate alerts, so the budget a panel shows is the budget the alerts spend. The
defaults are what the committed files under ``dashboards/`` were built with; a
deployment with other objectives builds its own (``build --settings FILE``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

# The contract's histogram buckets (docs/metrics): an SLI threshold must be one of them,
# or the good-event count would have to be interpolated, which an SLI must never be.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60, 120)


class BurnWindow(BaseModel):
    """One row of the SRE workbook's multi-window, multi-burn-rate table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    long: str
    short: str
    factor: float
    severity: str


# Google SRE workbook, "Alerting on SLOs", for a 30-day SLO window: 2 % of the budget in
# an hour pages, 5 % in six hours pages, 10 % in three days opens a ticket.
BURN_WINDOWS = (
    BurnWindow(long="1h", short="5m", factor=14.4, severity="page"),
    BurnWindow(long="6h", short="30m", factor=6, severity="page"),
    BurnWindow(long="3d", short="6h", factor=1, severity="ticket"),
)
RATE_WINDOWS = ("5m", "30m", "1h", "6h", "3d")
SLO_PERIOD = "30d"


class SloSettings(BaseModel):
    """Objectives and alert bounds (YAML keys are the field names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    availability_objective: float = Field(default=0.999, gt=0, lt=1)
    """Share of model calls (routes under /v1/) answered without a 5xx."""
    ttft_objective: float = Field(default=0.99, gt=0, lt=1)
    """Share of model calls whose first token arrives within ttft_threshold_s."""
    ttft_threshold_s: float = 1.0
    """A bucket boundary of bastion_time_to_first_token_seconds."""
    p99_ttft_bound_s: float = Field(default=0.5, gt=0)
    """BastionP99TimeToFirstTokenHigh fires above this (deployment guides: 500 ms)."""
    p99_overhead_bound_s: float = Field(default=0.2, gt=0)
    """BastionP99GatewayOverheadHigh fires above this (deployment guides: 200 ms)."""
    failure_ratio_bound: float = Field(default=0.01, gt=0, lt=1)
    repetition_bound: float = Field(default=0.15, gt=0, lt=1)
    prefix_cache_hit_floor: float = Field(default=0.85, gt=0, lt=1)

    @field_validator("ttft_threshold_s")
    @classmethod
    def _on_a_bucket(cls, value: float) -> float:
        if value not in BUCKETS_S:
            raise ValueError(f"must be one of the histogram's buckets {BUCKETS_S}")
        return value

    @property
    def availability_budget(self) -> float:
        return round(1 - self.availability_objective, 10)

    @property
    def ttft_budget(self) -> float:
        return round(1 - self.ttft_objective, 10)

    @property
    def ttft_le(self) -> str:
        """A regex for the threshold's ``le`` label: Prometheus 2 keeps the client's
        ``1.0``, Prometheus 3 normalises it to ``1``; this takes both."""
        text = f"{self.ttft_threshold_s:g}"
        return text if "." in text else f"{text}|{text}.0"


def load_slo_settings(path: Path | None) -> SloSettings:
    """Defaults, or the YAML mapping in ``path``; errors name the field."""
    if path is None:
        return SloSettings()
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of SLO settings")
    return SloSettings.model_validate(document)
