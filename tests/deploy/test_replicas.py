"""Scale-out on one machine: three ``bastion serve`` replicas behind nginx, one PostgreSQL
database, one Redis database, the fixture upstream (tests/deploy/cluster.py).

What Kubernetes would do to the gateway's pods, done here with processes: the per-key rate
limit and a revocation must hold across replicas, the replicas' metrics must add up, every
replica's audit chain must verify, SIGKILL of one replica under load must lose no answered
call, and a rolling restart (out of the balancer, preStop pause, SIGTERM, one at a time)
must fail no call and cut no stream.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from compliance.keyring import KeyRing
from compliance.reader import AuditReader
from gateway.store import make_engine
from tests.databases import postgres_database
from tests.deploy.cluster import Cluster
from tests.support import ProcessPool, chat_body, sse_data
from tests.upstream_server import SLOW_STREAM_CHUNKS, expected_text

REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CHAT = "/v1/chat/completions"
KEY_REFRESH_S = 1.0
PRE_STOP_S = 2.0  # streams (10 s) must end within uvicorn's 10 s drain after SIGTERM
FIGURES: dict[str, Any] = {}
SLOW_TEXT = " ".join(f"t{i}" for i in range(SLOW_STREAM_CHUNKS))  # the fixture's slow_stream

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def cluster(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The main cluster: generous rate limits; a fast model and a slowly streaming one."""
    pool = ProcessPool(tmp_path_factory.mktemp("replicas"))
    try:
        fast = pool.upstream("fast", ["dev-model"])
        slow = pool.upstream("slow", ["slow-model"])
        slow.set_mode("slow_stream")  # streams of 50 chunks, 0.2 s apart; others answer at once
        cluster = Cluster(
            pool,
            pool.work_dir / "cluster",
            database,
            REDIS_URL,
            [fast, slow],
            auth={"enabled": True, "key_refresh_s": KEY_REFRESH_S},
            rate_limits={"enabled": True, "requests_per_second": 10_000, "burst": 10_000},
            timeouts={"connect_s": 1.0, "read_s": 15.0},
        )
        done = cluster.migrate()
        assert done.returncode == 0, done.stdout + done.stderr
        cluster.start()
        cluster.app_key = cluster.create_key("app")["key"]
        cluster.admin_key = cluster.create_key("admin")["key"]
        yield cluster
    finally:
        if FIGURES:
            print("\nmulti-replica figures:", json.dumps(FIGURES, indent=1))
        with_cluster = locals().get("cluster")
        if with_cluster is not None:
            with_cluster.stop()
        pool.close()


def auth(key: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return headers


def scrape(url: str, key: str) -> float:
    """This replica's bastion_requests_total for model calls, every status."""
    r = httpx.get(f"{url}/metrics", headers=auth(key), timeout=5)
    assert r.status_code == 200, r.text[:300]
    total = 0.0
    for family in text_string_to_metric_families(r.text):
        if family.name == "bastion_requests":
            for sample in family.samples:
                if sample.name == "bastion_requests_total" and sample.labels["route"] == CHAT:
                    total += sample.value
    return total


def stream_ok(text: str, expected: str) -> bool:
    """A whole SSE answer: [DONE] at the end and every piece of the expected text."""
    data = sse_data(text.splitlines())
    if not data or data[-1] != "[DONE]":
        return False
    pieces = []
    for item in data[:-1]:
        for choice in json.loads(item).get("choices", []):
            pieces.append(choice.get("delta", {}).get("content") or "")
    return "".join(pieces) == expected


def test_metrics_of_the_replicas_sum_to_the_calls_sent(cluster: Cluster) -> None:
    before = sum(scrape(g.url, cluster.admin_key) for g in cluster.replicas)
    sent, replicas = 60, set()
    with httpx.Client(base_url=cluster.url, timeout=10) as http:
        for i in range(sent):
            r = http.post(CHAT, json=chat_body(content=f"m{i}"), headers=auth(cluster.app_key))
            assert r.status_code == 200, r.text
            replicas.add(r.headers["x-replica"])
    per_replica = [scrape(g.url, cluster.admin_key) for g in cluster.replicas]
    FIGURES["metrics"] = {"sent": sent, "per_replica": per_replica, "before": before}
    assert len(replicas) == 3, replicas  # the balancer used every replica
    assert sum(per_replica) - before == sent
    assert all(n > 0 for n in per_replica)


def test_revocation_through_one_replica_reaches_all_within_the_refresh(cluster: Cluster) -> None:
    key = cluster.create_key("app")
    for gateway in cluster.replicas:  # every replica knows the key
        r = httpx.post(f"{gateway.url}{CHAT}", json=chat_body(), headers=auth(key["key"]))
        assert r.status_code == 200, r.text
    r = httpx.delete(
        f"{cluster.replicas[0].url}/admin/keys/{key['id']}", headers=auth(cluster.admin_key)
    )
    assert r.status_code == 200, r.text
    revoked_at = time.monotonic()
    took: dict[int, float] = {}
    while len(took) < 3 and time.monotonic() - revoked_at < KEY_REFRESH_S + 3:
        for gateway in cluster.replicas:
            if gateway.port in took:
                continue
            r = httpx.post(f"{gateway.url}{CHAT}", json=chat_body(), headers=auth(key["key"]))
            if r.status_code == 401:
                took[gateway.port] = time.monotonic() - revoked_at
            else:
                assert r.status_code == 200, r.text
        time.sleep(0.02)
    FIGURES["revocation_s"] = sorted(round(s, 3) for s in took.values())
    assert len(took) == 3, took
    # The refresh interval, plus one round of this loop on a busy machine.
    assert max(took.values()) <= KEY_REFRESH_S + 0.5, took


def test_sigkill_under_load_loses_no_answered_call(cluster: Cluster) -> None:
    answered: list[str] = []
    failed: list[str] = []
    cut_streams: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=10) as http:
            n = 0
            while not stop.is_set():
                request_id = f"kill-{worker}-{n}"
                stream = n % 3 == 2
                n += 1
                try:
                    r = http.post(
                        CHAT,
                        json=chat_body(content=request_id, stream=stream),
                        headers=auth(cluster.app_key, request_id),
                    )
                except httpx.HTTPError:
                    with lock:
                        (cut_streams if stream else failed).append(request_id)
                    continue
                whole = r.status_code == 200 and (
                    not stream or stream_ok(r.text, expected_text("fast", "dev-model", request_id))
                )
                with lock:
                    if whole:
                        answered.append(request_id)
                    elif stream and r.status_code == 200:
                        cut_streams.append(request_id)
                    else:
                        failed.append(f"{request_id}: {r.status_code} {r.text[:120]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    killed_at = len(answered)
    cluster.kill(1)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(15)
    errors = (cluster.nginx.prefix / "error.log").read_text(errors="replace").splitlines()
    retried = [line for line in errors if "upstream" in line and "[error]" in line]
    FIGURES["sigkill"] = {
        "answered": len(answered),
        "answered_before_kill": killed_at,
        "failed": len(failed),
        "cut_streams": len(cut_streams),
        "nginx_upstream_errors": len(retried),
    }
    assert retried, "nginx never met the dead replica: the kill proved nothing"
    assert len(answered) - killed_at > 20, "too little load after the kill to prove anything"
    # nginx sent every call the dead replica did not answer to another one.
    assert failed == []
    # A stream whose first bytes had left the dead replica cannot be retried: at most one
    # per client was in flight.
    assert len(cut_streams) <= len(threads)
    engine = make_engine(cluster.database_url)
    try:
        master = __import__("base64").b64decode(cluster.master_key_file.read_text())
        reader = AuditReader(engine, KeyRing(engine, master))
        recorded = {
            json.loads(e.detail or "{}").get("client_request_id")
            for e in reader.entries(kinds=["request"], limit=1_000_000)
        }
    finally:
        engine.dispose()
    lost = [rid for rid in answered if rid not in recorded]
    assert lost == [], f"{len(lost)} of {len(answered)} answered calls have no audit entry"
    cluster.restart(1)


def test_rolling_restart_fails_no_call_and_cuts_no_stream(cluster: Cluster) -> None:
    """Each replica in turn: out of nginx, the preStop pause, SIGTERM while slow streams are
    in flight on it, start again, back in; clients never stop."""
    problems: list[str] = []
    answered = streams_whole = 0
    lock = threading.Lock()
    stop = threading.Event()

    def caller(worker: int) -> None:
        nonlocal answered
        with httpx.Client(base_url=cluster.url, timeout=20) as http:
            n = 0
            while not stop.is_set():
                request_id = f"roll-{worker}-{n}"
                n += 1
                try:
                    r = http.post(
                        CHAT,
                        json=chat_body(content=request_id),
                        headers=auth(cluster.app_key, request_id),
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        problems.append(f"{request_id}: {exc!r}")
                    continue
                with lock:
                    if r.status_code == 200:
                        answered += 1
                    else:
                        problems.append(f"{request_id}: {r.status_code} {r.text[:120]}")
                time.sleep(0.02)

    def streamer(target: str, request_id: str) -> None:
        nonlocal streams_whole
        try:
            r = httpx.post(
                f"{target}{CHAT}",
                json=chat_body(model="slow-model", content=request_id, stream=True),
                headers=auth(cluster.app_key, request_id),
                timeout=30,
            )
            whole = r.status_code == 200 and stream_ok(r.text, SLOW_TEXT)
        except httpx.HTTPError as exc:
            whole, r = False, exc  # type: ignore[assignment]
        with lock:
            if whole:
                streams_whole += 1
            else:
                tail = r.text[-400:] if isinstance(r, httpx.Response) else repr(r)
                problems.append(f"stream {request_id} cut: {tail}")

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for t in callers:
        t.start()
    drains = []
    streams: list[threading.Thread] = []
    try:

        def start_streams(index: int) -> None:
            # Streams on the replica about to go, sent to it directly (as a connection the
            # ingress holds), each about 10 s long.
            url = cluster.replicas[index].url
            batch = [
                threading.Thread(target=streamer, args=(url, f"roll-stream-{index}-{j}"))
                for j in range(2)
            ]
            for t in batch:
                t.start()
            streams.extend(batch)

        for index in range(len(cluster.replicas)):
            start_streams(index)  # under way through the balancer's reload and the preStop
            drains.append(round(cluster.drain(index, PRE_STOP_S), 2))
            cluster.restart(index)
    finally:
        stop.set()
        for t in [*callers, *streams]:
            t.join(30)
    FIGURES["rolling_restart"] = {
        "calls_answered": answered,
        "streams_whole": streams_whole,
        "drain_s": drains,
        "problems": len(problems),
    }
    assert problems == [], problems[:5]
    assert streams_whole == 6 and answered > 30
    # Each SIGTERM found its streams in flight and waited for them (uvicorn alone exits in
    # well under a second).
    assert min(drains) > 2.0, drains


def test_audit_chains_of_every_replica_verify(cluster: Cluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {
        "BASTION_DATABASE_URL": cluster.database_url,
        "BASTION_SIGNING_KEY_FILE": str(cluster.signing_key_file),
    }
    import subprocess

    from tests.support import bastion_command

    done = subprocess.run(
        [*bastion_command(), "audit", "verify"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    FIGURES["audit_verify"] = (done.stdout + done.stderr).strip().splitlines()[-3:]
    assert done.returncode == 0, done.stdout + done.stderr
    engine = make_engine(cluster.database_url)
    try:
        from sqlalchemy import text

        with engine.connect() as connection:
            writers = connection.execute(text("SELECT DISTINCT writer_id FROM audit_entries")).all()
    finally:
        engine.dispose()
    FIGURES["audit_writers"] = len(writers)
    # Three replicas, two of them restarted (a new chain each), the CLI's own entries.
    assert len(writers) >= 3


def test_rate_limit_holds_exactly_across_replicas(
    database: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A bucket of 10 that refills once in 1000 s: exactly 10 of 30 calls pass, however
    the balancer spreads them (each replica alone would pass 10)."""
    pool = ProcessPool(tmp_path_factory.mktemp("ratelimit"))
    try:
        upstream = pool.upstream("fast", ["dev-model"])
        strict = Cluster(
            pool,
            pool.work_dir / "cluster",
            database,
            REDIS_URL,
            [upstream],
            rate_limits={"enabled": True, "requests_per_second": 0.001, "burst": 10},
        )
        done = strict.migrate()
        assert done.returncode == 0, done.stdout + done.stderr
        strict.start()
        key = strict.create_key("app")["key"]
        statuses: dict[int, int] = {}
        replicas: dict[str, int] = {}
        with httpx.Client(base_url=strict.url, timeout=10) as http:
            for i in range(30):
                r = http.post(CHAT, json=chat_body(content=f"r{i}"), headers=auth(key))
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    replicas[r.headers["x-replica"]] = replicas.get(r.headers["x-replica"], 0) + 1
        FIGURES["rate_limit"] = {"statuses": statuses, "passed_per_replica": replicas}
        assert statuses == {200: 10, 429: 20}
        assert len(replicas) == 3, replicas
        strict.stop()
    finally:
        pool.close()


def test_replicas_cold_start_together_on_an_empty_database(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No migration Job: three replicas start at once on an empty database; the
    migration's advisory lock lets one migrate while the others wait (gateway.store)."""
    with postgres_database() as url:
        pool = ProcessPool(tmp_path_factory.mktemp("coldstart"))
        try:
            upstream = pool.upstream("fast", ["dev-model"])
            cluster = Cluster(pool, pool.work_dir / "cluster", url, REDIS_URL, [upstream])
            try:
                cluster.start()
            except RuntimeError as exc:
                assert "UniqueViolation" in str(exc) or "already exists" in str(exc), str(exc)
                raise
            assert len(cluster.replicas) == 3
            cluster.stop()
        finally:
            pool.close()
