"""Anomaly detection end to end inside a real ``bastion serve``: history, real traffic, an
injected incident (prompt stuffing), found and explained by the right cause family.

The detector stays silent until it has history (``min_history_s``, ``min_windows``), so
the test gives it some, honestly and quickly:

1. A gateway that only *records* the detector's events (``score_in_process: false``)
   takes ten seconds of real calls from each key, at the live traffic's pace; the rows
   it recorded (``anomaly_events``: the detector's own view of each request, durations
   and token counts included) are read back. The API says ``cold_start`` meanwhile.
2. Those rows are resampled into fifteen minutes of earlier traffic per key (Poisson
   arrivals at the rate the live traffic will have), recorded with the package's own
   ``store.insert_events``; the calibration calls themselves are removed.
3. The scoring gateway starts on the same database: its first scorer tick builds the
   windows of that history (cold start, nothing flagged), trains and stores a model;
   later ticks score the live windows.
4. Live traffic of the same kind, then one key stuffs its prompts (40 times its usual
   length) for four seconds: it must be flagged, that key's, of the size family,
   explained by a size feature with the key's usual value, listing that key's gateway
   request ids (``x-bastion-request-id``), in the audit log, ``GET
   /compliance/anomalies`` (auditor; an app key gets 403) and ``bastion anomalies
   list``; no other window may be flagged as size, nor as anything but latency.

About 60 s on the shared 2-core machine (two gateway starts, 24 s of traffic).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compliance.keyring import KeyRing
from compliance.reader import AuditReader
from gateway.store import make_engine
from monitors.anomaly import store
from monitors.anomaly.features import FEATURES, ROW_FIELDS
from tests.gateway.test_access import (
    MASTER_KEY,
    bearer,
    cli,
    make_key,
    secure_settings,
    wait_for_key,
)
from tests.support import Gateway, ProcessPool, assert_openai_error, chat_body, wait_until

WINDOW_S = 2.0
RATE = 2.0
"""Requests per second of each key, in the calibration calls, the recorded history and the
live traffic alike (the gateway's latency depends on the pace: measured at another, the
history's usual latency would not be the live traffic's)."""
HISTORY_S = 900.0
ANOMALY = {
    "window_s": WINDOW_S,
    "grace_s": 0.5,
    "flush_s": 0.2,
    "min_history_s": 600,
    "min_windows": 300,
    "trees": 50,
    "retrain_interval_s": 86_400,
}
USUAL_WORDS = (12, 30, 20)
"""Each traffic key's median prompt length in words (the fixture counts a word a token)."""
STUFFING = 40.0
SIZE_FEATURES = {f.name for f in FEATURES if f.family == "size"}


def prompt(rng: np.random.Generator, usual_words: int, factor: float = 1.0) -> str:
    words = max(1, int(usual_words * factor * np.exp(0.35 * rng.standard_normal())))
    return " ".join(f"w{n}" for n in rng.integers(0, 10_000, words))


class Traffic:
    """Calls through the gateway, remembering each one's gateway request id and usage."""

    def __init__(self, gateway: Gateway, keys: list[str], rng: np.random.Generator) -> None:
        self.gateway = gateway
        self.keys = keys
        self.rng = rng
        self.calls: list[dict[str, Any]] = []

    def call(self, k: int, factor: float = 1.0) -> dict[str, Any]:
        text = prompt(self.rng, USUAL_WORDS[k], factor)
        r = self.gateway.http.post(
            "/v1/chat/completions", json=chat_body("m1", text), headers=bearer(self.keys[k])
        )
        assert r.status_code == 200, r.text
        call = {"k": k, "id": r.headers["x-bastion-request-id"], "stuffed": factor > 1}
        call |= r.json()["usage"]
        self.calls.append(call)
        return call

    def run(self, seconds: float, factor: dict[int, float] | None = None) -> None:
        """Poisson arrivals of every key at RATE for ``seconds``, each call at its time;
        a key in ``factor`` sends prompts that many times its usual length."""
        schedule = [
            (float(t), k)
            for k in range(len(self.keys))
            for t in self.rng.uniform(0, seconds, self.rng.poisson(RATE * seconds))
        ]
        start = time.monotonic()
        for at, k in sorted(schedule):
            time.sleep(max(0.0, start + at - time.monotonic()))
            self.call(k, (factor or {}).get(k, 1.0))
        time.sleep(max(0.0, start + seconds - time.monotonic()))


def history(
    rng: np.random.Generator, measured: dict[str, list[tuple[Any, ...]]], end_us: int
) -> list[tuple[Any, ...]]:
    """HISTORY_S of earlier traffic per key: Poisson arrivals at RATE, each request one
    of the key's measured requests (its tokens, duration, time to first token, status)."""
    rows = []
    for sample in measured.values():
        count = rng.poisson(RATE * HISTORY_S)
        for arrival in rng.uniform(end_us - HISTORY_S * 1e6, end_us, count).astype(np.int64):
            row = dict(zip(ROW_FIELDS, sample[rng.integers(len(sample))], strict=True))
            took = row["end_us"] - row["arrival_us"]
            row |= {"request_id": uuid.uuid4().hex, "arrival_us": int(arrival)}
            row["end_us"] = int(arrival) + took
            rows.append(tuple(row[f] for f in ROW_FIELDS))
    return rows


def anomalies(gateway: Gateway, token: str, **params: str) -> dict[str, Any]:
    r = gateway.http.get("/compliance/anomalies", params=params, headers=bearer(token))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def natural(value: float) -> float:
    return float(np.expm1(value))  # the size features are log1p-scaled


@pytest.mark.timeout(180)
def test_prompt_stuffing_through_the_gateway_is_flagged_as_size(
    pool: ProcessPool, tmp_path: Path
) -> None:
    rng = np.random.default_rng(19)
    database = tmp_path / "bastion.db"
    upstream = pool.upstream("anomaly-up", ["m1"])
    env = {"BASTION_MASTER_KEY": MASTER_KEY}

    # 1. Keys, and real calls through a gateway that records but does not score.
    recorder = pool.gateway(
        [upstream],
        env=env,
        anomaly={**ANOMALY, "score_in_process": False},
        **secure_settings(database),
    )
    made = [make_key(recorder, "--role", "app") for _ in USUAL_WORDS]
    keys, key_ids = [m["key"] for m in made], [m["id"] for m in made]
    auditor = make_key(recorder, "--role", "auditor")["key"]
    for key in [*keys, auditor]:
        wait_for_key(recorder, key)
    cold = anomalies(recorder, auditor)
    assert cold["status"]["state"] == "cold_start" and cold["data"] == [], cold
    calibration = Traffic(recorder, keys, rng)
    calibration.run(10.0)
    wanted = {c["id"] for c in calibration.calls}
    engine = make_engine(f"sqlite:///{database}")
    try:
        wait_until(
            lambda: wanted <= {r[1] for r in store.read_events(engine, 0, 2**62)},
            10,
            what="the calibration calls recorded in anomaly_events",
        )
        recorder.stop()
        measured: dict[str, list[tuple[Any, ...]]] = {k: [] for k in key_ids}
        for row in store.read_events(engine, 0, 2**62):
            if row[1] in wanted:
                measured[row[0]].append(row)
        assert all(len(rows) >= 8 for rows in measured.values()), measured

        # 2. Fifteen minutes of history like them, in place of the burst.
        now_us = time.time_ns() // 1000
        store.prune(engine, now_us + 1, 0)
        store.insert_events(engine, history(rng, measured, now_us - 1_000_000))

        # 3. The scoring gateway: its first tick turns the history into a model.
        gateway = pool.gateway([upstream], env=env, anomaly=ANOMALY, **secure_settings(database))
        wait_until(
            lambda: anomalies(gateway, auditor)["status"]["state"] == "active",
            30,
            what="a model trained on the recorded history",
        )
        status = anomalies(gateway, auditor)["status"]
        assert status["model_version"] == 1 and status["windows"] >= ANOMALY["min_windows"]

        # 4. Normal traffic, then key 1 stuffs its prompts for a few seconds.
        live = Traffic(gateway, keys, rng)
        live.run(10.0)
        live.run(4.0, factor={1: STUFFING})
        incident_end = time.monotonic()
        stuffed = {c["id"] for c in live.calls if c["stuffed"]}
        assert len(stuffed) >= 2
        victim = key_ids[1]

        def stuffing_flags() -> list[dict[str, Any]]:
            data = anomalies(gateway, auditor, key=victim)["data"]
            return [f for f in data if stuffed & set(f["request_ids"])]

        wait_until(lambda: bool(stuffing_flags()), 20, interval=0.3, what="a flag of the stuffing")
        time.sleep(max(0.0, incident_end + 2 * WINDOW_S + 1.5 - time.monotonic()))
        everything = anomalies(gateway, auditor)["data"]
        flags = [f for f in stuffing_flags() if f["family"] == "size"]
        assert flags, "the stuffing was flagged, but not as size"
        victim_calls = [c for c in live.calls if c["k"] == 1]
        for flag in flags:
            assert flag["key_id"] == victim and flag["model"] == "m1"
            assert flag["explanation"]["family"] == "size"
            assert flag["score"] >= flag["threshold"] and flag["model_version"] == 1
            assert set(flag["request_ids"]) <= {c["id"] for c in victim_calls}
            assert flag["requests"] == len(flag["request_ids"])
            # Explained by a size feature, above the key's own usual value.
            top = flag["explanation"]["features"][0]
            assert top["family"] == "size" and top["name"] in SIZE_FEATURES, top
            assert top["contribution"] > 0 and "(usual " in top["text"]
            tokens = "prompt_tokens" if top["name"].startswith("prompt") else "completion_tokens"
            usual = sorted(c[tokens] for c in victim_calls if not c["stuffed"])
            assert 0.8 * usual[0] <= natural(top["usual"]) <= 1.25 * usual[-1], (top, usual)
            assert natural(top["value"]) > 2 * natural(top["usual"]), top
        flag = max(flags, key=lambda f: f["score"])
        top = flag["explanation"]["features"][0]
        assert natural(top["value"]) >= 5 * natural(top["usual"]), top

        # No other size flag, and nothing of another family but latency: a call slowed by
        # the shared machine is a latency anomaly (so is a window where the gateway's
        # guards took longer over a stuffed prompt that its window's median hides).
        for other in everything:
            if other["family"] == "size":
                assert other["key_id"] == victim and stuffed & set(other["request_ids"]), other
            else:
                assert other["family"] == "latency", other

        # Auditors and admins only.
        denied = gateway.http.get("/compliance/anomalies", headers=bearer(keys[0]))
        assert_openai_error(denied, 403, "permission_error", "permission_denied")

        # The audit log holds the flag.
        audit = AuditReader(engine, KeyRing(engine, base64.b64decode(MASTER_KEY)))

        def audited() -> list[dict[str, Any]]:
            found = audit.entries(kinds=["anomaly.flagged"], key_id=victim)
            return [json.loads(e.detail or "{}") for e in found]

        wait_until(
            lambda: any(d.get("anomaly_id") == flag["id"] for d in audited()),
            10,
            what="the size flag's anomaly.flagged audit entry",
        )
        detail = next(d for d in audited() if d["anomaly_id"] == flag["id"])
        assert detail["family"] == "size" and detail["request_ids"] == flag["request_ids"][:100]
        assert detail["reasons"][0] == top["text"]
    finally:
        engine.dispose()

    # And the CLI, with the gateway's configuration and master key.
    done = cli(gateway, "anomalies", "list", "--key", victim)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("detector: active (model version 1)"), done.stdout
    assert any(
        victim in line and " size " in line and top["text"] in line
        for line in done.stdout.splitlines()
    ), done.stdout
