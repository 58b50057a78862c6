"""Quick checks of the fixture upstream itself (no gateway involved)."""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

import httpx
import pytest

from tests.support import ProcessPool, Upstream, wait_until
from tests.upstream_server import embedding_for, expected_text


@pytest.fixture(scope="module")
def up(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("fx", ["m1", "m2"])


def sse_events(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi there"}], **extra}


def test_chat_non_stream(up: Upstream) -> None:
    r = httpx.post(f"{up.url}/v1/chat/completions", json=chat_body())
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == expected_text("fx", "m1", "hi there")
    assert data["usage"]["total_tokens"] == (
        data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    )
    stats = up.stats()
    assert stats["requests"] == 1 and stats["completed"] == 1 and stats["in_flight"] == 0
    assert stats["last_body"]["messages"][0]["content"] == "hi there"


def test_chat_stream_with_usage(up: Upstream) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{up.url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_text("fx", "m1", "hi there")
    assert len([c for c in chunks if c["choices"]]) >= 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_completion_stream_without_usage(up: Upstream) -> None:
    body = {"model": "m2", "prompt": "say it", "stream": True}
    with httpx.stream("POST", f"{up.url}/v1/completions", json=body) as r:
        events = sse_events(list(r.iter_lines()))
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text("fx", "m2", "say it")


def test_embeddings_float_and_base64(up: Upstream) -> None:
    r = httpx.post(f"{up.url}/v1/embeddings", json={"model": "m1", "input": ["a", "b"]})
    data = r.json()["data"]
    assert [d["embedding"] for d in data] == [embedding_for("a"), embedding_for("b")]
    r = httpx.post(
        f"{up.url}/v1/embeddings",
        json={"model": "m1", "input": "a", "encoding_format": "base64"},
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == embedding_for("a")


def test_models_and_validation(up: Upstream) -> None:
    assert [m["id"] for m in httpx.get(f"{up.url}/v1/models").json()["data"]] == ["m1", "m2"]
    r = httpx.post(f"{up.url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{up.url}/v1/chat/completions", json={"model": "m1", "messages": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{up.url}/v1/chat/completions", json=chat_body(model="nope"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_error500_counted_mode(up: Upstream) -> None:
    up.set_mode("error500", count=2)
    codes = [httpx.post(f"{up.url}/v1/chat/completions", json=chat_body()).status_code]
    codes += [httpx.post(f"{up.url}/v1/chat/completions", json=chat_body()).status_code]
    codes += [httpx.post(f"{up.url}/v1/chat/completions", json=chat_body()).status_code]
    assert codes == [500, 500, 200]


def test_hang_is_cancelled_when_client_leaves(up: Upstream) -> None:
    up.set_mode("hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{up.url}/v1/chat/completions", json=chat_body(), timeout=0.3)
    wait_until(lambda: up.stats()["cancelled"] == 1, 2.0, what="hang cancelled")
    assert up.stats()["in_flight"] == 0


def test_drop_closes_connection(up: Upstream) -> None:
    up.set_mode("drop", count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{up.url}/v1/chat/completions", json=chat_body(), timeout=2.0)
    assert httpx.post(f"{up.url}/v1/chat/completions", json=chat_body()).status_code == 200


def test_slow_stream_disconnect_counts_cancelled(up: Upstream) -> None:
    up.set_mode("slow_stream")
    start = time.monotonic()
    got: list[str] = []
    with httpx.stream("POST", f"{up.url}/v1/chat/completions", json=chat_body(stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 2:
                break
    assert time.monotonic() - start < 2.0
    wait_until(lambda: up.stats()["cancelled"] == 1, 2.0, what="stream cancelled")
    stats = up.stats()
    assert stats["in_flight"] == 0 and stats["completed"] == 0


def test_health_control(up: Upstream) -> None:
    up.set_health(503)
    assert httpx.get(f"{up.url}/health").status_code == 503
    up.reset()
    assert httpx.get(f"{up.url}/health").status_code == 200


def test_die_mid_stream(pool: ProcessPool) -> None:
    victim = pool.upstream("victim", ["m1"])
    victim.set_mode("die_mid_stream")
    events: list[str] = []
    try:
        with httpx.stream(
            "POST", f"{victim.url}/v1/chat/completions", json=chat_body(stream=True)
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
    except httpx.HTTPError:
        pass  # an incomplete chunked body is the expected way for this to end
    assert len(events) == 3 and "[DONE]" not in events[-1]
    wait_until(lambda: not victim.alive(), 2.0, what="victim process to die")
    victim.restart()
    r2 = httpx.post(f"{victim.url}/v1/chat/completions", json=chat_body())
    assert r2.status_code == 200
