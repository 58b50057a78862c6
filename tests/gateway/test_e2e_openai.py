"""End-to-end: the official ``openai`` client against a real ``bastion serve`` process.

The gateway runs as a subprocess in front of fixture upstreams (tests/upstream_server.py),
so these tests exercise the whole external contract in docs/contract-issue2.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support import (
    Gateway,
    ProcessPool,
    Upstream,
    assert_openai_error,
    chat_body,
    upstream_entry,
)
from tests.upstream_server import embedding_for, expected_text

MAX_BODY = 64 * 1024
UPSTREAM_KEY = "sk-upstream-alpha"
ALPHA_MODELS = ["dev-model", "embed-model"]
# ghost-model is configured on the gateway but not served by the alpha fixture, which
# therefore answers 404 itself: the gateway must pass that 4xx through unchanged.
GATEWAY_MODELS = [*ALPHA_MODELS, "ghost-model"]


@pytest.fixture(scope="module")
def alpha(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("alpha", ALPHA_MODELS)


@pytest.fixture(scope="module")
def gw(module_pool: ProcessPool, alpha: Upstream) -> Gateway:
    entry = upstream_entry(alpha, models=GATEWAY_MODELS, api_key=UPSTREAM_KEY)
    return module_pool.gateway([entry], server={"max_body_bytes": MAX_BODY})


@pytest.fixture(scope="module")
def routing_upstreams(module_pool: ProcessPool) -> dict[str, Upstream]:
    return {
        "r-alpha": module_pool.upstream("r-alpha", ["w-model", "model-a", "canary-base"]),
        "r-beta": module_pool.upstream("r-beta", ["w-model", "model-b"]),
        "r-gamma": module_pool.upstream("r-gamma", ["canary-v2"]),
    }


CANARY_SHARE = 0.3


@pytest.fixture(scope="module")
def routing_gw(module_pool: ProcessPool, routing_upstreams: dict[str, Upstream]) -> Gateway:
    ups = routing_upstreams
    return module_pool.gateway(
        [
            upstream_entry(ups["r-alpha"], weight=1),
            upstream_entry(ups["r-beta"], weight=3),
            upstream_entry(ups["r-gamma"], weight=1),
        ],
        canaries=[{"model": "canary-base", "version": "canary-v2", "share": CANARY_SHARE}],
    )


@pytest.fixture
def client(gw: Gateway) -> Iterator[OpenAI]:
    with OpenAI(base_url=gw.base_url, api_key="sk-client", max_retries=0, timeout=15) as c:
        yield c


@pytest.fixture
async def aclient(gw: Gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.base_url, api_key="sk-client", max_retries=0, timeout=15)


# --- chat completions ----------------------------------------------------------------------


def test_chat_completion_sync(client: OpenAI, alpha: Upstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="dev-model",
        messages=[{"role": "user", "content": "hello gateway"}],
        extra_headers={"x-request-id": "e2e-req-0001"},
    )
    assert raw.status_code == 200
    assert raw.headers["x-request-id"] == "e2e-req-0001"
    assert raw.headers["x-bastion-upstream"] == "alpha"
    completion = raw.parse()
    assert completion.choices[0].message.content == expected_text(
        "alpha", "dev-model", "hello gateway"
    )
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    stats = alpha.stats()
    assert stats["requests"] == 1
    assert stats["last_body"]["messages"] == [{"role": "user", "content": "hello gateway"}]
    # The configured upstream key replaces the client's key on the way out.
    assert stats["last_request_headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_request_id_generated_when_absent(client: OpenAI) -> None:
    ids = set()
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="dev-model", messages=[{"role": "user", "content": "x"}]
        )
        request_id = raw.headers.get("x-request-id")
        assert request_id, raw.headers
        ids.add(request_id)
    assert len(ids) == 2, "each request gets its own id"


@pytest.mark.parametrize("sent", ["x" * 5000, "has spaces in it", 'quote"<tag>'])
def test_insane_request_id_is_replaced(gw: Gateway, sent: str) -> None:
    r = gw.http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": sent})
    assert r.status_code == 200
    echoed = r.headers.get_list("x-request-id")
    assert len(echoed) == 1 and echoed[0] and echoed[0] != sent, echoed


def test_chat_stream_sync(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="dev-model",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "e2e-stream-0001"},
    )
    assert raw.headers["x-request-id"] == "e2e-stream-0001"
    assert raw.headers["x-bastion-upstream"] == "alpha"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 3, "the answer arrives as several events"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("alpha", "dev-model", "stream please")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_is_passed_through_event_by_event(client: OpenAI, alpha: Upstream) -> None:
    # slow_stream sends 50 events 0.2 s apart (10 s): the first ones must reach the client
    # long before the upstream finishes, i.e. the gateway does not buffer the stream.
    alpha.set_mode("slow_stream", count=1)
    start = time.monotonic()
    stream = client.chat.completions.create(
        model="dev-model", messages=[{"role": "user", "content": "slow"}], stream=True
    )
    arrivals = []
    for chunk in stream:
        arrivals.append(time.monotonic() - start)
        assert chunk.object == "chat.completion.chunk"
        if len(arrivals) == 4:
            break
    stream.close()
    assert arrivals[-1] < 3.0, arrivals
    assert arrivals[-1] - arrivals[1] >= 0.3, f"events were batched, not streamed: {arrivals}"


async def test_chat_completion_async(aclient: AsyncOpenAI) -> None:
    async with aclient:
        raw = await aclient.chat.completions.with_raw_response.create(
            model="dev-model",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "async hello"},
            ],
            extra_headers={"x-request-id": "e2e-async-0001"},
        )
        assert raw.headers["x-request-id"] == "e2e-async-0001"
        assert raw.headers["x-bastion-upstream"] == "alpha"
        completion = raw.parse()
        assert completion.choices[0].message.content == expected_text(
            "alpha", "dev-model", "async hello"
        )
        assert completion.usage is not None and completion.usage.prompt_tokens > 0


async def test_chat_stream_async(aclient: AsyncOpenAI) -> None:
    async with aclient:
        stream = await aclient.chat.completions.create(
            model="dev-model",
            messages=[{"role": "user", "content": "async stream"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("alpha", "dev-model", "async stream")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_concurrent_requests_are_isolated(aclient: AsyncOpenAI) -> None:
    async def one(i: int) -> str | None:
        completion = await aclient.chat.completions.create(
            model="dev-model", messages=[{"role": "user", "content": f"request {i}"}]
        )
        return completion.choices[0].message.content

    async with aclient:
        answers = await asyncio.gather(*(one(i) for i in range(30)))
    assert answers == [expected_text("alpha", "dev-model", f"request {i}") for i in range(30)]


# --- completions ---------------------------------------------------------------------------


def test_completion_sync(client: OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model="dev-model", prompt="complete me")
    assert raw.headers["x-bastion-upstream"] == "alpha"
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text == expected_text("alpha", "dev-model", "complete me")
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_completion_stream_sync(client: OpenAI) -> None:
    stream = client.completions.create(
        model="dev-model",
        prompt="stream me",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(
        "alpha", "dev-model", "stream me"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_completion_stream_async(aclient: AsyncOpenAI) -> None:
    async with aclient:
        stream = await aclient.completions.create(
            model="dev-model", prompt="async completion", stream=True
        )
        chunks = [c async for c in stream]
    assert len(chunks) >= 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(
        "alpha", "dev-model", "async completion"
    )


# --- embeddings and models -----------------------------------------------------------------


def test_embeddings_sync(client: OpenAI, alpha: Upstream) -> None:
    # The client asks for base64 by default and decodes it.
    result = client.embeddings.create(model="embed-model", input=["first", "second"])
    assert [d.embedding for d in result.data] == [embedding_for("first"), embedding_for("second")]
    assert result.usage.total_tokens > 0
    assert alpha.stats()["last_body"]["input"] == ["first", "second"]
    floats = client.embeddings.create(model="embed-model", input="third", encoding_format="float")
    assert floats.data[0].embedding == embedding_for("third")


async def test_embeddings_async(aclient: AsyncOpenAI) -> None:
    async with aclient:
        raw = await aclient.embeddings.with_raw_response.create(model="embed-model", input="x")
        assert raw.headers["x-bastion-upstream"] == "alpha"
        assert raw.parse().data[0].embedding == embedding_for("x")


def test_models_list(client: OpenAI, alpha: Upstream) -> None:
    models = client.models.list()
    assert sorted(m.id for m in models.data) == sorted(GATEWAY_MODELS)
    assert all(m.object == "model" for m in models.data)
    raw = httpx.get(f"{client.base_url}models", headers={"x-request-id": "e2e-models-1"})
    assert raw.json()["object"] == "list"
    assert raw.headers["x-request-id"] == "e2e-models-1"


async def test_models_list_async(aclient: AsyncOpenAI) -> None:
    async with aclient:
        page = await aclient.models.list()
    assert {m.id for m in page.data} == set(GATEWAY_MODELS)


def test_upstream_4xx_passed_through(gw: Gateway, alpha: Upstream) -> None:
    upstream_answer = {
        "error": {
            "message": "fixture upstream alpha: the model `ghost-model` does not exist",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
    }
    r = gw.http.post("/v1/chat/completions", json=chat_body("ghost-model"))
    assert r.status_code == 404
    assert r.headers["x-bastion-upstream"] == "alpha"
    assert r.json() == upstream_answer
    # The same for a stream request refused before it started.
    r = gw.http.post("/v1/chat/completions", json=chat_body("ghost-model", stream=True))
    assert r.status_code == 404
    assert r.json() == upstream_answer
    assert alpha.stats()["requests"] == 2
    # A 4xx is the client's problem, not the upstream's: no breaker failure.
    assert gw.admin_upstreams()["alpha"]["consecutive_failures"] == 0


# --- errors produced by the gateway itself ---------------------------------------------------


def test_unknown_model_404(gw: Gateway, client: OpenAI, alpha: Upstream) -> None:
    r = gw.http.post(
        "/v1/chat/completions",
        json=chat_body("no-such-model"),
        headers={"x-request-id": "e2e-404-model"},
    )
    error = assert_openai_error(r, 404, "invalid_request_error", "model_not_found")
    assert error["param"] in (None, "model")
    assert r.headers["x-request-id"] == "e2e-404-model"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.code == "model_not_found"
    r = gw.http.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
    assert_openai_error(r, 404, "invalid_request_error", "model_not_found")
    assert alpha.stats()["requests"] == 0, "unknown models never reach an upstream"


def test_unknown_route_and_wrong_method(gw: Gateway) -> None:
    r = gw.http.get("/v1/nothing-here")
    assert_openai_error(r, 404, "invalid_request_error", "not_found")
    r = gw.http.get("/v1/chat/completions")
    assert_openai_error(r, 405, "invalid_request_error", "method_not_allowed")


def test_malformed_json_400(gw: Gateway, alpha: Upstream) -> None:
    r = gw.http.post(
        "/v1/chat/completions",
        content=b'{"model": "dev-model", "messages": [',
        headers={"content-type": "application/json", "x-request-id": "e2e-bad-json"},
    )
    assert_openai_error(r, 400, "invalid_request_error", "invalid_json")
    assert r.headers["x-request-id"] == "e2e-bad-json"
    r = gw.http.post(
        "/v1/completions", content=b"not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400, "invalid_request_error", "invalid_json")
    assert alpha.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "dev-model", "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        (
            "/v1/chat/completions",
            {"model": 7, "messages": [{"role": "user", "content": "x"}]},
            "model",
        ),
        ("/v1/completions", {"model": "dev-model", "prompt": "x", "stream": "yes"}, "stream"),
    ],
)
def test_schema_error_400(
    gw: Gateway, alpha: Upstream, path: str, body: dict[str, object], param: str
) -> None:
    r = gw.http.post(path, json=body)
    error = assert_openai_error(r, 400, "invalid_request_error", "invalid_request")
    assert error["param"] is not None and error["param"].split(".")[0].split("[")[0] == param, error
    assert alpha.stats()["requests"] == 0


def test_body_too_large_413(gw: Gateway, alpha: Upstream) -> None:
    big = chat_body(content="x" * (MAX_BODY + 1024))
    r = gw.http.post("/v1/chat/completions", json=big, headers={"x-request-id": "e2e-413"})
    assert_openai_error(r, 413, "invalid_request_error", "request_too_large")
    assert r.headers["x-request-id"] == "e2e-413"

    # Without a Content-Length (chunked upload) the limit holds as well.
    payload = json.dumps(big).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = gw.http.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 413, "invalid_request_error", "request_too_large")
    assert alpha.stats()["requests"] == 0
    # Just under the limit is fine.
    ok = gw.http.post("/v1/chat/completions", json=chat_body(content="y" * (MAX_BODY - 1024)))
    assert ok.status_code == 200


def test_health_endpoints(gw: Gateway) -> None:
    r = gw.http.get("/healthz", headers={"x-request-id": "e2e-healthz"})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["x-request-id"] == "e2e-healthz"
    r = gw.http.get("/readyz")
    assert r.status_code == 200 and "alpha" in r.text
    admin = gw.admin_upstreams()
    assert set(admin) == {"alpha"}
    entry = admin["alpha"]
    assert {"name", "url", "models", "weight", "healthy", "breaker", "consecutive_failures"} <= set(
        entry
    )
    assert entry["healthy"] is True and entry["breaker"] == "closed"
    assert entry["models"] == GATEWAY_MODELS
    assert "api_key" not in entry and UPSTREAM_KEY not in json.dumps(admin)


# --- routing -------------------------------------------------------------------------------


def _route_counts(gw: Gateway, model: str, n: int) -> tuple[Counter[str], Counter[str]]:
    """Upstream names from the header and from the answer text, over ``n`` requests."""
    by_header: Counter[str] = Counter()
    by_text: Counter[str] = Counter()
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        for i in range(n):
            r = http.post("/v1/chat/completions", json=chat_body(model, f"n{i}"))
            assert r.status_code == 200, r.text
            by_header[r.headers["x-bastion-upstream"]] += 1
            text = r.json()["choices"][0]["message"]["content"]
            by_text[text.split()[0].removeprefix("upstream=") + " " + text.split()[1]] += 1
    return by_header, by_text


def test_weighted_routing(routing_gw: Gateway) -> None:
    n = 200
    by_header, by_text = _route_counts(routing_gw, "w-model", n)
    assert set(by_header) <= {"r-alpha", "r-beta"}, by_header
    beta_share = by_header["r-beta"] / n
    # weights 1:3 -> 0.75 expected; the bound is about 4.5 standard deviations wide.
    assert 0.6 <= beta_share <= 0.9, by_header
    assert by_text == Counter({f"{name} model=w-model": count for name, count in by_header.items()})


def test_routing_by_model(routing_gw: Gateway) -> None:
    by_header, _ = _route_counts(routing_gw, "model-a", 20)
    assert by_header == Counter({"r-alpha": 20})
    by_header, _ = _route_counts(routing_gw, "model-b", 20)
    assert by_header == Counter({"r-beta": 20})


def test_canary_share(routing_gw: Gateway, routing_upstreams: dict[str, Upstream]) -> None:
    n = 200
    by_header, by_text = _route_counts(routing_gw, "canary-base", n)
    assert set(by_header) <= {"r-alpha", "r-gamma"}, by_header
    share = by_header["r-gamma"] / n
    assert 0.15 <= share <= 0.45, by_header  # expected 0.3
    # The canary upstream is asked for the version, the rest for the model itself.
    assert by_text == Counter(
        {
            **({"r-alpha model=canary-base": by_header["r-alpha"]} if by_header["r-alpha"] else {}),
            **({"r-gamma model=canary-v2": by_header["r-gamma"]} if by_header["r-gamma"] else {}),
        }
    )
    assert routing_upstreams["r-gamma"].stats()["last_body"]["model"] == "canary-v2"
    # Asking for the version directly always goes to it.
    direct, _ = _route_counts(routing_gw, "canary-v2", 10)
    assert direct == Counter({"r-gamma": 10})
