"""The request path's seams and what they guarantee (issue 14 items 1-3, issue 15).

Unit tests for the pipeline's pieces, then a real ``bastion serve`` with the audit on:
whatever is forwarded can be recorded, a client cannot choose its own vLLM priority, and
refusals do not store the bodies they refuse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import GatewayError, InvalidRequest
from gateway.json_depth import check_json_depth
from gateway.pipeline import CallContext, CallSinks, run_filters
from gateway.rbac import Principal
from monitors.request_event import RequestEvent
from tests.gateway.test_audit_trail import audited_gateway, client_request_id, reader
from tests.support import ProcessPool, assert_openai_error, chat_body, sse_data


def nested(depth: int) -> Any:
    """``depth`` arrays, one in another."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def call_context(body: dict[str, Any] | None = None, stream: bool = False) -> CallContext:
    principal = Principal("k1", frozenset({"app"}), "s1", None, "standard")
    event = RequestEvent(time_us=1, request_id="r1", route="/v1/chat/completions")
    request = body or chat_body("m")
    return CallContext("/v1/chat/completions", {}, principal, event, b"{}", request, stream=stream)


def test_json_depth_is_bounded_before_parsing_the_schema() -> None:
    at_limit = orjson.dumps({"x": nested(63)})  # the object is one level more: 64
    check_json_depth(at_limit, 64)
    with pytest.raises(InvalidRequest) as refused:
        check_json_depth(orjson.dumps({"x": nested(64)}), 64)
    assert refused.value.code == "json_too_deep" and "64" in refused.value.message
    # Brackets in strings are not nesting; invalid JSON is left to the parser.
    check_json_depth(orjson.dumps({"x": "[[[[{{{{" * 100}), 64)
    check_json_depth(b"[" * 500, 64)


def test_a_check_changes_the_forwarded_body_never_the_request() -> None:
    call = call_context()
    assert call.forward_body() == call.raw  # unchanged: the bytes as received
    call.change("priority", 5)
    assert json.loads(call.forward_body())["priority"] == 5
    assert "priority" not in call.request  # what the caller asked stays for the audit


class Upper:
    def __init__(self) -> None:
        self.closed = False

    async def feed(self, data: bytes) -> bytes:
        return data.upper()

    async def close(self) -> bytes:
        self.closed = True
        return b"tail"


class HoldBack:
    """Releases nothing until the answer ends."""

    def __init__(self) -> None:
        self.held = b""

    async def feed(self, data: bytes) -> bytes:
        self.held += data
        return b""

    async def close(self) -> bytes:
        return self.held


async def test_filters_run_in_order_and_closing_bytes_pass_the_later_ones() -> None:
    hold, upper = HoldBack(), Upper()
    assert await run_filters([hold, upper], b"ab", last=False) == b""
    assert await run_filters([hold, upper], b"cd", last=True) == b"ABCDtail"
    assert upper.closed


class Durable:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[CallContext] = []
        self.fail = fail

    async def complete(self, call: CallContext) -> None:
        if self.fail:
            raise InvalidRequest("cannot record")
        self.calls.append(call)


class Sink:
    name = "test"

    def __init__(self, broken: bool = False) -> None:
        self.events: list[RequestEvent] = []
        self.broken = broken

    def offer(self, event: RequestEvent) -> None:
        if self.broken:
            raise RuntimeError("a monitor's bug")
        self.events.append(event)


async def test_sinks_record_each_call_once_and_a_broken_sink_fails_nothing() -> None:
    durable, sink, errors = Durable(), Sink(), []
    sinks = CallSinks([durable], [Sink(broken=True), sink], on_sink_error=errors.append)
    call = call_context()
    await sinks.complete(call, 200)
    await sinks.complete(call, 500)  # once only
    assert durable.calls == [call] and sink.events == [call.event]
    assert call.event.status == 200 and call.event.duration_s > 0
    assert errors == ["test"]
    # A durable sink that cannot record fails the call before its answer goes out.
    with pytest.raises(GatewayError):
        await CallSinks([Durable(fail=True)]).complete(call_context(), 200)


async def test_settlements_run_once_with_the_usage() -> None:
    call, seen = call_context(), []

    async def settle(usage: Any) -> None:
        seen.append(usage)

    call.settlements.append(settle)
    await call.settle(None)
    await call.settle(None)
    assert seen == [None]


# --- through a real gateway ------------------------------------------------------------


def test_deep_json_is_refused_before_forwarding_and_every_call_is_recorded(
    pool: ProcessPool, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'bastion.db'}"
    gateway, upstream, _ = audited_gateway(pool, tmp_path, database_url)
    before = upstream.stats()["requests"]
    for body in (
        chat_body(stream=True, stream_options={"include_usage": True}, x=nested(300)),
        chat_body(x=nested(100)),
        {"model": "dev-model", "messages": [{"role": "user", "content": nested(500)}]},
    ):
        r = gateway.http.post("/v1/chat/completions", json=body)
        assert_openai_error(r, 400, "invalid_request_error", "json_too_deep")
    assert upstream.stats()["requests"] == before  # nothing went upstream

    # Just under the limit: forwarded, streamed, recorded.
    body = chat_body(stream=True, x=nested(60), **{"stream_options": {"include_usage": True}})
    with gateway.http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-request-id": "deep-ok"}
    ) as r:
        assert r.status_code == 200
        assert sse_data(r.iter_lines())[-1] == "[DONE]"
    engine, audit = reader(database_url)
    try:
        (entry,) = [e for e in audit.entries(limit=100) if client_request_id(e) == "deep-ok"]
        assert entry.status == 200
        assert audit.payload(entry)["request"]["x"] == nested(60)
    finally:
        engine.dispose()


def test_refused_calls_keep_a_digest_not_the_body(pool: ProcessPool, tmp_path: Path) -> None:
    database = tmp_path / "bastion.db"
    gateway, _, _ = audited_gateway(pool, tmp_path, f"sqlite:///{database}")
    gateway.http.post("/v1/chat/completions", json=chat_body())  # tables and chain exist
    size_before = os.path.getsize(database)
    filler = "x" * (4 * 1024 * 1024 - 200)
    for i in range(60):
        r = gateway.http.post(
            "/v1/chat/completions",
            json=chat_body("no-such-model", content=filler),
            headers={"x-request-id": f"refused-{i}"},
        )
        assert_openai_error(r, 404, "invalid_request_error", "model_not_found")
    grown = os.path.getsize(database) - size_before
    assert grown < 1024 * 1024, f"60 refused 4 MB bodies added {grown} bytes"
    engine, audit = reader(f"sqlite:///{database}")
    try:
        (entry,) = [e for e in audit.entries(limit=200) if client_request_id(e) == "refused-0"]
        payload = audit.payload(entry)
        assert entry.status == 404 and "request" not in payload
        assert len(payload["request_sha256"]) == 64 and payload["request_bytes"] > 4_000_000
        assert len(payload["request_excerpt"]) <= 512
        assert "does not exist" in json.dumps(payload["response"])
    finally:
        engine.dispose()


def test_the_key_tier_decides_priority_not_the_client(pool: ProcessPool, tmp_path: Path) -> None:
    from tests.gateway.test_access import (
        MASTER_KEY,
        bearer,
        make_key,
        secure_settings,
        wait_for_key,
    )

    upstream = pool.upstream("prio-up", ["m1"])
    gateway = pool.gateway(
        [upstream],
        env={"BASTION_MASTER_KEY": MASTER_KEY},
        **secure_settings(tmp_path / "bastion.db"),
    )
    standard = make_key(gateway, "--role", "app")["key"]
    operator = make_key(gateway, "--role", "model_admin")["key"]
    wait_for_key(gateway, standard)
    wait_for_key(gateway, operator)
    for key, expected in ((standard, 0), (operator, -1000)):
        body = chat_body("m1", priority=-1000)
        r = gateway.http.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert upstream.stats()["last_body"]["priority"] == expected


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, b'{"detail":"Not Found"}', "The upstream answered 404: Not Found"),
        (400, b"bad things", "The upstream answered 400: bad things"),
        (503, b"", "The upstream answered 503: no detail"),
    ],
)
def test_upstream_errors_reach_the_client_in_openai_shape(
    status: int, body: bytes, message: str
) -> None:
    from gateway.proxy import openai_error

    error = json.loads(openai_error(status, body))["error"]
    assert error["message"] == message and error["code"] == f"upstream_{status}"
    assert error["type"] == ("invalid_request_error" if status < 500 else "upstream_error")
    shaped = b'{"error": {"message": "m", "type": "t", "code": "c"}}'
    assert openai_error(404, shaped) == shaped  # already OpenAI's: passed as it is


def test_two_calls_with_one_client_id_get_two_gateway_ids(
    pool: ProcessPool, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'bastion.db'}"
    gateway, _, _ = audited_gateway(pool, tmp_path, database_url)
    ids = set()
    for _ in range(2):
        r = gateway.http.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-request-id": "same"}
        )
        assert r.headers["x-request-id"] == "same"
        ids.add(r.headers["x-bastion-request-id"])
    assert len(ids) == 2
    engine, audit = reader(database_url)
    try:
        entries = [e for e in audit.entries(limit=10) if client_request_id(e) == "same"]
        assert {e.request_id for e in entries} == ids
    finally:
        engine.dispose()


def metric_value(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and found == wanted:
            return float(value)
    return 0.0


def test_refusals_and_calls_reach_the_metrics(pool: ProcessPool, tmp_path: Path) -> None:
    from tests.gateway.test_access import (
        MASTER_KEY,
        bearer,
        make_key,
        secure_settings,
        wait_for_key,
    )

    upstream = pool.upstream("metrics-up", ["m1"])
    gateway = pool.gateway(
        [upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **secure_settings(tmp_path / "b.db")
    )
    admin = make_key(gateway, "--role", "admin")["key"]
    wait_for_key(gateway, admin)
    http = gateway.http
    http.post("/v1/chat/completions", json=chat_body("m1"))  # missing
    http.post("/v1/chat/completions", json=chat_body("m1"), headers={"authorization": "Basic x"})
    http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer("bst_" + "a" * 40))
    for _ in range(3):
        assert http.post("/v1/chat/completions", json=chat_body("m1"), headers=bearer(admin))
    text = http.get("/metrics", headers=bearer(admin)).text
    assert metric_value(text, "bastion_auth_failures_total", reason="missing") == 1
    assert metric_value(text, "bastion_auth_failures_total", reason="malformed") >= 1
    assert (
        metric_value(
            text,
            "bastion_requests_total",
            route="/v1/chat/completions",
            model="m1",
            status_class="2xx",
        )
        == 3
    )
    assert metric_value(text, "bastion_tokens_total", model="m1", type="output") > 0
    duration = metric_value(
        text, "bastion_request_duration_seconds_count", route="/v1/chat/completions", model="m1"
    )
    assert duration >= 3
    # The audit writer's commits (its thread reports to the metrics).
    assert metric_value(text, "bastion_audit_write_duration_seconds_count") >= 1
