"""The ``anomaly:`` configuration section (the gateway embeds it in its Settings)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AnomalySettings(BaseModel):
    """Anomaly detection: windows, alert budget, training schedule, cold start, retention."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    score_in_process: bool = True
    """Score in the gateway (one process at a time, by lease). False: the gateway only
    records events and a separate ``bastion monitor`` scores them."""
    window_s: float = Field(30.0, gt=0, le=3600)
    grace_s: float = Field(5.0, ge=0, le=600)
    """A window is scored this long after it ends (events are recorded in batches)."""
    flush_s: float = Field(1.0, gt=0, le=60)
    queue_max: int = Field(100_000, ge=100)
    """Events waiting to be recorded; beyond this they are dropped (and counted)."""
    budget_per_million: float = Field(20.0, gt=0)
    """Alert budget: false flags per day per million requests the threshold allows."""
    train_days: float = Field(7.0, gt=0)
    retrain_interval_s: float = Field(6 * 3600.0, gt=0)
    min_history_s: float = Field(24 * 3600.0, ge=0)
    """Cold start: no flags until the recorded windows span this long..."""
    min_windows: int = Field(1000, ge=10)
    """...and there are this many of them."""
    event_retention_s: float = Field(24 * 3600.0, gt=0)
    lease_ttl_s: float = Field(60.0, gt=0)
    trees: int = Field(200, ge=10, le=2000)
    max_samples: int = Field(256, ge=16)
    weight: float = Field(0.5, ge=0)
    """The forest's weight against the baselines (tuned by bench/anomaly.py)."""
