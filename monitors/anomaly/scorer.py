"""The scoring loop: one process at a time (by lease) turns recorded events into scored
windows, flags, and, on a schedule, a retrained model.

Each :meth:`AnomalyScorer.tick` (blocking: run it in a thread) takes or renews the
``anomaly-scorer`` lease (compliance/job_lease.py, as audit retention does). The holder
reads the events that ended since the last scored window boundary (kept in the lease's
``last_run_us``, so a new holder continues where the old one stopped), builds the key
windows that have ended (``grace_s`` after their end), scores them (a backfill in
time-ordered parts, so that each window meets the profiles of the windows before it),
explains the flagged ones, stores windows and flags, and returns the flags for the caller
to send on (metrics are counted here). Then, when due, it retrains on the recent unflagged
windows and stores the new model version. Until there is enough history (cold start)
windows are recorded but nothing is flagged.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine

from compliance.job_lease import JobLease
from monitors.anomaly import store
from monitors.anomaly.detector import AnomalyModel, ZTrail, fit_model
from monitors.anomaly.explain import Explainer
from monitors.anomaly.features import EventColumns, FeatureBuilder, WindowBatch
from monitors.anomaly.profiles import KeyProfiles
from monitors.anomaly.settings import AnomalySettings
from monitors.metrics import ANOMALY_FLAGS, ANOMALY_SCORE

log = logging.getLogger("bastion.anomaly")
LEASE_NAME = "anomaly-scorer"
MAX_BACKFILL_US = 3_600_000_000
"""A scorer that was away longer than this scores only the last hour."""
MAX_REQUEST_IDS = 500
MAX_CHUNKS = 120
"""A backfill is scored in at most this many time-ordered batches (see ``_chunks``)."""


def _now_us() -> int:
    return time.time_ns() // 1000


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class TickResult:
    held: bool
    windows: int = 0
    flags: list[dict[str, Any]] = field(default_factory=list)
    trained: int | None = None
    """The new model's version when this tick trained one."""


class AnomalyScorer:
    def __init__(
        self,
        engine: Engine,
        settings: AnomalySettings,
        mac_key: bytes,
        *,
        holder: str | None = None,
        clock: Callable[[], int] = _now_us,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.lease = JobLease(engine, LEASE_NAME, holder, ttl_s=settings.lease_ttl_s, clock=clock)
        self._mac_key = mac_key
        self._clock = clock
        self._window_us = int(settings.window_s * 1e6)
        self.builder = FeatureBuilder(settings.window_s, KeyProfiles())
        self.model: AnomalyModel | None = None
        self.explainer: Explainer | None = None
        self.trail = ZTrail()
        self._held = False
        self._scored_to: int | None = None
        self._next_train_check = 0

    def tick(self) -> TickResult:
        if not self.lease.acquire():
            self._held = False
            return TickResult(held=False)
        if not self._held:
            self._take_over()
        now = self._clock()
        boundary = (now - int(self.settings.grace_s * 1e6)) // self._window_us * self._window_us
        # The first holder ever, or one after a long gap, starts at most an hour back.
        start = max(self._scored_to or 0, boundary - MAX_BACKFILL_US)
        result = TickResult(held=True)
        if boundary > start:
            rows = store.read_events(self.engine, start, boundary)
            if rows:
                for part in self._chunks(EventColumns.from_rows(rows)):
                    batch = self.builder.build(part)
                    result.windows += len(batch)
                    result.flags += self._score(batch)
            if not self.lease.record_run(boundary):
                self._held = False
                return result
            self._scored_to = boundary
        result.trained = self._maybe_train(now)
        return result

    def _chunks(self, cols: EventColumns) -> list[EventColumns]:
        """The events in time order, cut at window edges into at most MAX_CHUNKS parts.

        A window's rate and hour features compare it with its key's profile of *earlier*
        windows, which is updated after each batch. Live ticks see a window or two at a
        time, but a backfill (the first holder, a takeover after a gap) reads up to an
        hour at once: built as one batch, all of it would be compared with the profile as
        it was before (empty on a first start, so the rate features were missing in every
        training window and any busier live window looked like a volume anomaly).
        """
        window = cols.end_us // self._window_us
        first = int(window.min())
        per_chunk = max(1, -(-(int(window.max()) - first + 1) // MAX_CHUNKS))
        chunk = (window - first) // per_chunk
        order = np.argsort(chunk, kind="stable")
        edges = np.flatnonzero(np.diff(chunk[order])) + 1
        return [cols.take(part) for part in np.split(order, edges)]

    def _take_over(self) -> None:
        """Newly holding the lease: the stored model, and where the last holder stopped."""
        self._held = True
        self._scored_to = self.lease.state().last_run_us
        self._load_model()

    def _load_model(self) -> None:
        try:
            model = store.load_latest_model(self.engine, self._mac_key)
        except store.ModelRefused as exc:
            log.warning("anomaly: %s; not used, a new one will be trained", exc)
            model = None
        if model is not None and (self.model is None or model.version != self.model.version):
            self._use(model)

    def _use(self, model: AnomalyModel) -> None:
        # A holder that has been scoring keeps its own (newer) profiles.
        if not self.builder.profiles.keys:
            self.builder.profiles = copy.deepcopy(model.profiles)
        self.model = model
        self.explainer = Explainer(model)

    def _score(self, batch: WindowBatch) -> list[dict[str, Any]]:
        model, flags = self.model, []
        if model is None or self.explainer is None:
            flagged = np.zeros(len(batch), dtype=bool)
            store.insert_windows(self.engine, batch, None, flagged)
        else:
            scores = model.score(batch, self.trail)
            flagged = model.flagged(scores)
            for value in scores.isolation:
                ANOMALY_SCORE.observe(float(value))
            rows = np.flatnonzero(flagged)
            explanations = self.explainer.explain(scores, rows)
            for row, explanation in zip(rows, explanations, strict=True):
                ids = batch.requests_of(int(row))
                start = int(batch.start_us[row])
                flags.append(
                    {
                        "time_us": start + self._window_us,
                        "window_start_us": start,
                        "key_id": str(batch.key_id[row]),
                        "model": None if batch.model[row] is None else str(batch.model[row]),
                        "family": explanation["family"],
                        "score": float(scores.total[row]),
                        "threshold": float(model.threshold),
                        "model_version": model.version,
                        "requests": int(batch.n[row]),
                        "request_ids": ids[:MAX_REQUEST_IDS],
                        "explanation": explanation,
                    }
                )
                ANOMALY_FLAGS.labels(explanation["family"]).inc()
            store.insert_windows(self.engine, batch, scores.total, flagged)
            for record, number in zip(
                flags, store.insert_anomalies(self.engine, flags), strict=True
            ):
                record["id"] = number
        self.builder.profiles.update(batch, keep=~flagged)
        return flags

    def _maybe_train(self, now: int) -> int | None:
        settings = self.settings
        if self.model is not None:
            if now - self.model.trained_to_us < settings.retrain_interval_s * 1e6:
                return None
        elif now < self._next_train_check:
            return None
        self._next_train_check = now + 60_000_000
        history = store.history(self.engine)
        if history.windows < settings.min_windows or history.span_s < settings.min_history_s:
            return None
        since = now - int(settings.train_days * 86_400e6)
        data = store.training_windows(self.engine, since)
        if len(data.X) < settings.min_windows:
            return None
        span_days = max(min(history.span_s, settings.train_days * 86_400) / 86_400, 1 / 24)
        model = fit_model(
            data.key_id,
            data.X,
            start_us=data.start_us,
            profiles=copy.deepcopy(self.builder.profiles),
            window_s=settings.window_s,
            span_days=span_days,
            requests=data.requests,
            budget_per_million=settings.budget_per_million,
            weight=settings.weight,
            trees=settings.trees,
            max_samples=settings.max_samples,
        )
        model.trained_from_us = max(since, history.first_us or since)
        model.trained_to_us = now
        version = store.save_model(self.engine, model, self._mac_key, now)
        self.model, self.explainer = model, Explainer(model)
        store.prune(
            self.engine,
            now - int(settings.event_retention_s * 1e6),
            now - int((settings.train_days + 1) * 86_400e6),
        )
        log.info("anomaly: model version %d trained on %d windows", version, len(data.X))
        return version

    def release(self) -> None:
        self.lease.release()
        self._held = False


def detector_status(engine: Engine, settings: AnomalySettings) -> dict[str, Any]:
    """What the API says about the detector: active with a model, or still cold."""
    info = store.latest_model_info(engine)
    if info is not None:
        return {
            "state": "active",
            "model_version": info["version"],
            "trained_at": iso(info["created_us"]),
            "trained_from": iso(info["trained_from_us"]),
            "windows": info["rows"],
            "threshold": info["threshold"],
            "budget_per_million": settings.budget_per_million,
        }
    history = store.history(engine)
    return {
        "state": "cold_start",
        "reason": "not enough history yet: nothing is flagged until a model is trained",
        "windows": history.windows,
        "windows_needed": settings.min_windows,
        "history_s": history.span_s,
        "history_needed_s": settings.min_history_s,
    }
