"""Fault injection: upstreams that die, hang, fail, refuse or lose their client.

Every test checks the error the client sees (status and OpenAI error shape, or the final
SSE error event), that the gateway keeps serving afterwards, and where it matters the
circuit breaker and health state shown on /admin/upstreams and /readyz.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support import (
    ERROR_KEYS,
    Gateway,
    ProcessPool,
    Upstream,
    assert_openai_error,
    chat_body,
    free_port,
    sse_data,
    upstream_entry,
    wait_until,
)
from tests.upstream_server import expected_text

THRESHOLD = 3  # circuit_breaker.failure_threshold in these tests
OPEN_S = 1.0  # circuit_breaker.open_s
READ_S = 1.0  # timeouts.read_s for the timeout tests
# A weight this lopsided makes the heavy upstream the first choice in practice
# (probability 1 - 1e-6), so a test can aim a request at a faulty upstream.
HEAVY = 1000.0
LIGHT = 0.001


@pytest.fixture(scope="module")
def u1(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("u1", ["dev-model"])


@pytest.fixture(scope="module")
def u2(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("u2", ["dev-model"])


def openai_client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=gw.base_url, api_key="sk-client", max_retries=0, timeout=15)


def post_chat(gw: Gateway, **kwargs: Any) -> httpx.Response:
    return gw.http.post("/v1/chat/completions", json=chat_body(**kwargs))


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return response.headers["x-bastion-upstream"]


def breaker(gw: Gateway, name: str) -> str:
    return str(gw.admin_upstreams()[name]["breaker"])


def stream_events(gw: Gateway, body: dict[str, object]) -> tuple[httpx.Response, list[str]]:
    """All data payloads of a streamed answer, tolerating an abrupt end of the body."""
    events: list[str] = []
    with gw.http.stream("POST", "/v1/chat/completions", json=body) as r:
        try:
            events = sse_data(r.iter_lines())
        except httpx.HTTPError as exc:  # pragma: no cover - reported below
            pytest.fail(f"the gateway broke the stream instead of ending it cleanly: {exc!r}")
    return r, events


# --- upstream killed mid-stream ---------------------------------------------------------------


def test_killed_mid_stream_openai_client_raises_api_error(pool: ProcessPool) -> None:
    victim = pool.upstream("victim", ["dev-model"])
    spare = pool.upstream("spare", ["dev-model"])
    gw = pool.gateway([upstream_entry(victim, weight=HEAVY), upstream_entry(spare, weight=LIGHT)])
    victim.set_mode("die_mid_stream")
    client = openai_client(gw)
    stream = client.chat.completions.create(
        model="dev-model", messages=[{"role": "user", "content": "doomed request"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    # The chunks sent before the crash reached the client ...
    assert len(received) == 3, received
    full = expected_text("victim", "dev-model", "doomed request")
    assert "".join(received) == full.removesuffix(" request"), received
    # ... and then an error event, not a broken connection.
    assert not isinstance(info.value, openai.APIConnectionError), repr(info.value)
    assert isinstance(info.value.body, dict) and set(info.value.body) == ERROR_KEYS
    wait_until(lambda: not victim.alive(), 3.0, what="the victim upstream to be dead")

    # The gateway keeps serving through the second upstream, at once.
    for _ in range(5):
        completion = client.chat.completions.create(
            model="dev-model", messages=[{"role": "user", "content": "after"}]
        )
        assert completion.choices[0].message.content == expected_text("spare", "dev-model", "after")
    assert gw.http.get("/healthz").status_code == 200
    client.close()


def test_killed_mid_stream_error_event_then_restarted_upstream(pool: ProcessPool) -> None:
    victim = pool.upstream("victim", ["dev-model"])
    gw = pool.gateway([victim])
    victim.set_mode("die_mid_stream")
    r, events = stream_events(gw, chat_body(content="doomed", stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-bastion-upstream"] == "victim"
    assert len(events) == 4, events
    assert "[DONE]" not in events
    for event in events[:3]:
        assert json.loads(event)["object"] == "chat.completion.chunk"
    final = json.loads(events[-1])
    assert set(final) == {"error"} and set(final["error"]) == ERROR_KEYS, final
    assert final["error"]["type"] in ("upstream_error", "timeout"), final
    assert final["error"]["message"]

    # While it is down: an immediate, well-formed error (502 or 503), never a hang.
    wait_until(lambda: not victim.alive(), 3.0, what="the victim upstream to be dead")
    r = post_chat(gw)
    if r.status_code == 502:
        assert_openai_error(r, 502, "upstream_error", "upstream_error")
    else:
        assert_openai_error(r, 503, "service_unavailable", "no_healthy_upstream")

    # Restarted on the same port, it serves again once health checks / the breaker allow.
    victim.restart()
    deadline = OPEN_S + 5.0
    wait_until(lambda: post_chat(gw).status_code == 200, deadline, 0.1, "service to resume")
    assert served_by(post_chat(gw, content="back")) == "victim"


# --- upstream that hangs ------------------------------------------------------------------------


def test_hanging_upstream_gives_504_within_read_timeout(pool: ProcessPool, u1: Upstream) -> None:
    gw = pool.gateway([u1], timeouts={"read_s": READ_S})
    u1.set_mode("hang", count=1)
    start = time.monotonic()
    r = post_chat(gw)
    elapsed = time.monotonic() - start
    assert_openai_error(r, 504, "timeout", "upstream_timeout")
    assert READ_S * 0.9 <= elapsed <= READ_S + 2.0, elapsed
    # The gateway gave up on the upstream request rather than leaving it open.
    wait_until(lambda: u1.stats()["cancelled"] == 1, 2.0, what="hung request closed")
    # It keeps serving.
    assert served_by(post_chat(gw)) == "u1"

    # A stream request that hangs before its first byte gets the same JSON 504.
    u1.set_mode("hang", count=1)
    start = time.monotonic()
    r = post_chat(gw, stream=True)
    assert time.monotonic() - start <= READ_S + 2.0
    assert_openai_error(r, 504, "timeout", "upstream_timeout")
    wait_until(lambda: u1.stats()["in_flight"] == 0, 2.0, what="no request left in flight")
    assert served_by(post_chat(gw)) == "u1"


def test_hanging_upstream_is_retried_on_another(
    pool: ProcessPool, u1: Upstream, u2: Upstream
) -> None:
    gw = pool.gateway(
        [upstream_entry(u1, weight=HEAVY), upstream_entry(u2, weight=LIGHT)],
        timeouts={"read_s": READ_S},
    )
    u1.set_mode("hang")
    start = time.monotonic()
    r = post_chat(gw, content="rescued")
    elapsed = time.monotonic() - start
    assert served_by(r) == "u2"
    assert r.json()["choices"][0]["message"]["content"] == expected_text(
        "u2", "dev-model", "rescued"
    )
    assert READ_S * 0.9 <= elapsed <= READ_S + 2.0, elapsed
    assert u1.stats()["requests"] == 1


# --- upstream answering 500 ---------------------------------------------------------------------


def test_upstream_500_gives_502(pool: ProcessPool, u1: Upstream, u2: Upstream) -> None:
    gw = pool.gateway([u1, u2])
    u1.set_mode("error500")
    u2.set_mode("error500")
    r = post_chat(gw)
    assert_openai_error(r, 502, "upstream_error", "upstream_error")
    # max_attempts=2 over distinct upstreams: each was tried exactly once.
    assert (u1.stats()["requests"], u2.stats()["requests"]) == (1, 1)
    # A stream request failing before its first byte gets a JSON 502 too.
    r = post_chat(gw, stream=True)
    assert_openai_error(r, 502, "upstream_error", "upstream_error")
    # It keeps serving once the upstreams recover.
    u1.reset()
    u2.reset()
    assert served_by(post_chat(gw)) in ("u1", "u2")


def test_one_failing_upstream_is_retried_and_its_breaker_opens_then_recovers(
    pool: ProcessPool, u1: Upstream, u2: Upstream
) -> None:
    gw = pool.gateway(
        [upstream_entry(u1, weight=HEAVY), upstream_entry(u2, weight=LIGHT)],
        circuit_breaker={"failure_threshold": THRESHOLD, "open_s": OPEN_S},
    )
    u1.set_mode("error500")
    for i in range(THRESHOLD):
        assert breaker(gw, "u1") == "closed", f"open after only {i} failures"
        r = post_chat(gw, content=f"retry {i}")
        assert served_by(r) == "u2"
        assert r.json()["choices"][0]["message"]["content"] == expected_text(
            "u2", "dev-model", f"retry {i}"
        )
    assert u1.stats()["requests"] == THRESHOLD
    state = gw.admin_upstreams()["u1"]
    assert state["breaker"] == "open", state
    assert state["consecutive_failures"] >= THRESHOLD, state
    assert gw.admin_upstreams()["u2"]["breaker"] == "closed"

    # While open, u1 gets no traffic at all.
    opened_at = time.monotonic()
    for _ in range(5):
        assert served_by(post_chat(gw)) == "u2"
    if time.monotonic() - opened_at < OPEN_S * 0.8:
        assert u1.stats()["requests"] == THRESHOLD

    # u1 recovers: after open_s a probe succeeds and the breaker closes again.
    u1.set_mode("ok")

    def recovered() -> bool:
        post_chat(gw)
        return breaker(gw, "u1") == "closed"

    waited = wait_until(recovered, OPEN_S + 4.0, 0.1, "u1's breaker to close")
    assert waited >= OPEN_S * 0.5, "the breaker must stay open for about open_s"
    assert served_by(post_chat(gw)) == "u1"
    assert gw.admin_upstreams()["u1"]["consecutive_failures"] == 0


def test_breaker_open_on_sole_upstream_gives_503_then_recovers(
    pool: ProcessPool, u1: Upstream
) -> None:
    gw = pool.gateway([u1], circuit_breaker={"failure_threshold": THRESHOLD, "open_s": OPEN_S})
    u1.set_mode("error500")
    for _ in range(THRESHOLD):
        assert_openai_error(post_chat(gw), 502, "upstream_error", "upstream_error")
    assert breaker(gw, "u1") == "open"
    r = post_chat(gw)
    assert_openai_error(r, 503, "service_unavailable", "no_healthy_upstream")
    assert u1.stats()["requests"] == THRESHOLD, "an open breaker keeps requests away"
    u1.set_mode("ok")
    wait_until(lambda: post_chat(gw).status_code == 200, OPEN_S + 4.0, 0.1, "recovery")
    assert breaker(gw, "u1") == "closed"


# --- upstream refusing connections / dropping them ---------------------------------------------


def test_refused_connections(pool: ProcessPool, u1: Upstream) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}"
    gw = pool.gateway(
        [
            upstream_entry("ghost", models=["ghost-model"], url=dead_url),
            upstream_entry(u1, models=["dev-model"]),
        ],
        wait_ready=False,
    )
    r = post_chat(gw, model="ghost-model")
    if r.status_code == 502:
        assert_openai_error(r, 502, "upstream_error", "upstream_error")
    else:
        assert_openai_error(r, 503, "service_unavailable", "no_healthy_upstream")

    # Health checks notice: /readyz turns 503 with per-upstream detail, requests get 503.
    wait_until(lambda: gw.http.get("/readyz").status_code == 503, 3.0, what="/readyz 503")
    ready = gw.http.get("/readyz")
    assert ready.headers["content-type"].startswith("application/json")
    assert "ghost" in ready.text and "u1" in ready.text
    wait_until(lambda: not gw.admin_upstreams()["ghost"]["healthy"], 3.0, what="ghost unhealthy")
    assert_openai_error(
        post_chat(gw, model="ghost-model"), 503, "service_unavailable", "no_healthy_upstream"
    )

    # Everything else keeps working.
    assert gw.http.get("/healthz").status_code == 200
    assert served_by(post_chat(gw, model="dev-model")) == "u1"
    assert gw.admin_upstreams()["u1"]["healthy"] is True


def test_refused_connection_is_retried_on_another(pool: ProcessPool, u1: Upstream) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}"
    gw = pool.gateway(
        [
            upstream_entry("ghost", models=["dev-model"], url=dead_url, weight=HEAVY),
            upstream_entry(u1, weight=LIGHT),
        ],
        health_check={"enabled": False},
        wait_ready=False,
    )
    for i in range(THRESHOLD + 2):
        assert served_by(post_chat(gw, content=f"r{i}")) == "u1"
    assert breaker(gw, "ghost") == "open"


def test_dropped_connection(pool: ProcessPool, u1: Upstream, u2: Upstream) -> None:
    gw = pool.gateway([upstream_entry(u1, weight=HEAVY), upstream_entry(u2, weight=LIGHT)])
    # Both drop the connection without answering: 502 once each was tried.
    u1.set_mode("drop", count=1)
    u2.set_mode("drop", count=1)
    assert_openai_error(post_chat(gw), 502, "upstream_error", "upstream_error")
    assert (u1.stats()["requests"], u2.stats()["requests"]) == (1, 1)
    # One drops: the request is retried on the other.
    u1.set_mode("drop", count=1)
    assert served_by(post_chat(gw)) == "u2"
    # And the dropping one serves again afterwards.
    assert served_by(post_chat(gw)) == "u1"


# --- client that disconnects mid-stream -------------------------------------------------------


def test_client_disconnect_closes_upstream_request(pool: ProcessPool, u1: Upstream) -> None:
    gw = pool.gateway([u1])
    client = openai_client(gw)
    # Warm up pooled connections, then take the baseline.
    for _ in range(3):
        client.chat.completions.create(
            model="dev-model", messages=[{"role": "user", "content": "w"}]
        )
    baseline = gw.open_fds()

    for round_ in range(1, 4):
        u1.set_mode("slow_stream", count=1)
        stream = client.chat.completions.create(
            model="dev-model", messages=[{"role": "user", "content": "bye"}], stream=True
        )
        for got, _chunk in enumerate(stream, start=1):
            if got == 2:
                break
        stream.close()
        closed_at = time.monotonic()
        assert u1.stats()["completed"] == 3, "the slow stream (10 s) cannot have finished"
        took = wait_until(
            lambda n=round_: u1.stats()["cancelled"] == n,
            2.0,
            0.02,
            f"upstream stream #{round_} to be cancelled",
        )
        assert took <= 1.0 + 0.5, took
        assert time.monotonic() - closed_at < 2.0
        wait_until(lambda: u1.stats()["in_flight"] == 0, 2.0, what="upstream in_flight == 0")

    # Still serving, and nothing leaked: the fd count returns to its baseline.
    completion = client.chat.completions.create(
        model="dev-model", messages=[{"role": "user", "content": "still here"}]
    )
    assert completion.choices[0].message.content == expected_text("u1", "dev-model", "still here")
    client.close()
    wait_until(lambda: gw.open_fds() <= baseline + 2, 3.0, what=f"gateway fds <= {baseline + 2}")
    assert u1.stats()["in_flight"] == 0


def test_client_disconnect_raw_stream(pool: ProcessPool, u1: Upstream) -> None:
    gw = pool.gateway([u1])
    u1.set_mode("slow_stream", count=1)
    with (
        httpx.Client(base_url=gw.url, timeout=10) as http,
        http.stream(
            "POST", "/v1/completions", json={"model": "dev-model", "prompt": "p", "stream": True}
        ) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen == 2:
                break
    wait_until(lambda: u1.stats()["cancelled"] == 1, 1.5, 0.02, "upstream cancelled")
    assert u1.stats()["in_flight"] == 0
    assert served_by(post_chat(gw)) == "u1"


def test_client_disconnect_while_waiting_for_a_whole_answer(
    pool: ProcessPool, u1: Upstream
) -> None:
    """Not only streams: a client that gives up on a long non-streamed answer frees it."""
    gw = pool.gateway([u1], timeouts={"read_s": 30.0})
    u1.set_mode("hang", count=1)
    with httpx.Client(base_url=gw.url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=chat_body())
    wait_until(lambda: u1.stats()["cancelled"] == 1, 1.5, 0.02, "upstream request closed")
    assert u1.stats()["in_flight"] == 0
    assert served_by(post_chat(gw)) == "u1"


# --- no healthy upstream -------------------------------------------------------------------------


def test_no_healthy_upstream_503(pool: ProcessPool, u1: Upstream) -> None:
    gw = pool.gateway([u1])
    u1.set_health(503)
    wait_until(lambda: not gw.admin_upstreams()["u1"]["healthy"], 3.0, what="u1 marked unhealthy")
    before = u1.stats()["requests"]
    r = post_chat(gw)
    assert_openai_error(r, 503, "service_unavailable", "no_healthy_upstream")
    r = gw.http.post("/v1/embeddings", json={"model": "dev-model", "input": "x"})
    assert_openai_error(r, 503, "service_unavailable", "no_healthy_upstream")
    assert u1.stats()["requests"] == before, "unhealthy upstreams get no traffic"
    assert gw.http.get("/readyz").status_code == 503
    assert gw.http.get("/healthz").status_code == 200

    u1.set_health(200)
    wait_until(lambda: gw.http.get("/readyz").status_code == 200, 3.0, what="/readyz 200")
    assert served_by(post_chat(gw)) == "u1"
