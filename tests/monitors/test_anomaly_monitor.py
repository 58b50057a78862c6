"""End to end through AnomalyMonitor: events offered as the gateway does, a cold start,
a trained model, an injected incident flagged, explained by the right family, stored,
with its request ids; a second scorer waits for the lease and resumes after it."""

from __future__ import annotations

import numpy as np
from sqlalchemy import Engine

from monitors.anomaly import store
from monitors.anomaly.monitor import AnomalyMonitor
from monitors.anomaly.scorer import AnomalyScorer, detector_status
from monitors.anomaly.settings import AnomalySettings
from tests.monitors.anomaly_db import anomaly_engine  # noqa: F401
from tests.monitors.anomaly_traffic import START_US, traffic

SETTINGS = AnomalySettings(
    window_s=10,
    grace_s=1,
    min_history_s=1800,
    min_windows=200,
    trees=50,
    budget_per_million=1,
    retrain_interval_s=86_400,
)
MAC_KEY = b"k" * 32


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def test_incident_flagged_and_explained(anomaly_engine: Engine) -> None:  # noqa: F811
    engine = anomaly_engine
    rng = np.random.default_rng(1)
    clock = Clock(START_US)
    flagged: list[dict] = []
    scorer = AnomalyScorer(engine, SETTINGS, MAC_KEY, holder="one", clock=clock)
    monitor = AnomalyMonitor(engine, SETTINGS, MAC_KEY, scorer=scorer, on_flag=[flagged.append])
    other = AnomalyScorer(engine, SETTINGS, MAC_KEY, holder="two", clock=clock)
    assert detector_status(engine, SETTINGS)["state"] == "cold_start"
    step = 600
    for n in range(8):  # 80 minutes of normal traffic, scored 10 minutes at a time
        for event in traffic(rng, START_US + n * step * 1_000_000, step):
            monitor.offer(event)
        await monitor.flush()
        clock.now = START_US + (n + 1) * step * 1_000_000 + 2_000_000
        result = await monitor.tick()
        assert result.held
        assert not other.tick().held  # one scorer at a time
    assert not flagged, [(f["key_id"], f["explanation"]["features"][:2]) for f in flagged]
    status = detector_status(engine, SETTINGS)
    assert status["state"] == "active", status
    assert scorer.model is not None and scorer.model.version == status["model_version"]

    # Prompt stuffing on key-b for two minutes.
    from monitors.metrics import ANOMALY_FLAGS

    size_flags = ANOMALY_FLAGS.labels("size")._value.get()
    begin = START_US + 8 * step * 1_000_000
    events = traffic(rng, begin, 120, prompt_factor={"key-b": 40.0})
    stuffed = {e.request_id for e in events if e.key_id == "key-b"}
    for event in events:
        monitor.offer(event)
    await monitor.flush()
    clock.now = begin + 125_000_000
    await monitor.tick()
    assert flagged, "the stuffing was not flagged"
    assert {f["key_id"] for f in flagged} == {"key-b"}
    assert all(f["family"] == "size" for f in flagged)
    assert ANOMALY_FLAGS.labels("size")._value.get() - size_flags == len(flagged)
    first = flagged[0]
    # The window's requests: the stuffed ones (and at most a straggler that ended in it).
    assert len(set(first["request_ids"]) & stuffed) >= len(first["request_ids"]) - 2 > 0
    top = first["explanation"]["features"][0]
    assert top["family"] == "size" and "usual" in top["text"]
    assert first["explanation"]["baseline"]["share"] > 0
    rows, _ = store.query_anomalies(engine, store.AnomalyFilter(key_id="key-b"), 100)
    assert {r["id"] for r in rows} == {f["id"] for f in flagged}

    # The holder stops: the other scorer takes over where it stopped, with the stored model.
    await monitor.stop()
    assert other.tick().held
    assert other.model is not None and other.model.version == scorer.model.version
    assert other.lease.state().last_run_us == scorer.lease.state().last_run_us


def test_offer_is_bounded_and_counts_drops(anomaly_engine: Engine) -> None:  # noqa: F811
    from monitors.metrics import EVENT_SINK_DROPPED

    before = EVENT_SINK_DROPPED.labels("anomaly")._value.get()
    monitor = AnomalyMonitor(anomaly_engine, AnomalySettings(queue_max=100), MAC_KEY)
    events = traffic(np.random.default_rng(2), START_US, 200)
    assert len(events) > 150
    for event in events[:150]:
        monitor.offer(event)
    assert monitor.dropped == 50
    assert EVENT_SINK_DROPPED.labels("anomaly")._value.get() - before == 50


def test_flag_as_audit_record_and_ecs_alert() -> None:
    from compliance.records import prepare
    from monitors.anomaly.records import ANOMALY_FLAGGED, audit_record, ecs_document

    flag = {
        "id": 7,
        "time_us": START_US + 30_000_000,
        "window_start_us": START_US,
        "key_id": "key-b",
        "model": "m1",
        "family": "size",
        "score": 12.3456789,
        "threshold": 6.0,
        "model_version": 3,
        "requests": 600,
        "request_ids": [f"req-{n}" for n in range(600)],
        "explanation": {"features": [{"text": f"t{n}"} for n in range(5)]},
    }
    record = audit_record(flag)
    assert record.kind == ANOMALY_FLAGGED and record.key_id == "key-b"
    assert len(record.detail["request_ids"]) == 100 and record.detail["reasons"] == [
        "t0",
        "t1",
        "t2",
    ]
    prepare(record)  # the audit writer accepts it
    document = ecs_document(flag)
    assert document["event"]["kind"] == "alert" and document["rule"]["name"] == "anomaly.size"
    assert document["@timestamp"] == "2026-01-01T00:00:30Z"


async def test_start_records_and_scores_in_the_background(anomaly_engine: Engine) -> None:  # noqa: F811
    import asyncio
    import time

    settings = AnomalySettings(window_s=1, grace_s=0, flush_s=0.05)
    monitor = AnomalyMonitor(anomaly_engine, settings, MAC_KEY, holder="bg")
    await monitor.start()
    now = time.time_ns() // 1000
    events = traffic(np.random.default_rng(4), now - 3_000_000, 2)
    for event in events:
        monitor.offer(event)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if store.history(anomaly_engine).windows > 0:
            break
    await monitor.stop()
    assert monitor.recorded == len(events)
    assert store.history(anomaly_engine).windows > 0  # scored (cold start: nothing flagged)
    assert not monitor.scorer.lease.state().held  # given up on stop
