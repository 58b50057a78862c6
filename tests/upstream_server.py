"""A small OpenAI-wire-compatible upstream used as a test fixture.

Run it as ``python tests/upstream_server.py --port P [--name NAME] [--models m1,m2]``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``.  Answers are deterministic:
the text is ``upstream=<name> model=<model> echo=<last user message or prompt>``.

Test control endpoints (not part of the OpenAI API):

* ``POST /_fixture/mode {"mode": M, "count": N}`` - fault mode for the next N ``/v1``
  requests (all of them when ``count`` is absent), then back to ``ok``.  Modes: ``ok``,
  ``error500``, ``hang``, ``die_mid_stream``, ``slow_stream``, ``drop``.
* ``POST /_fixture/health {"status": 503}`` - status answered by ``GET /health``.
* ``GET /_fixture/stats`` - request counters and the last request seen.
* ``POST /_fixture/reset`` - back to mode ``ok``, healthy, zeroed counters.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

MODES = ("ok", "error500", "hang", "die_mid_stream", "slow_stream", "drop")
EMBEDDING_DIM = 8
SLOW_STREAM_CHUNKS = 50
SLOW_STREAM_INTERVAL_S = 0.2
DIE_AFTER_CHUNKS = 3

Handler = Callable[[web.Request, dict[str, Any], str], Awaitable[web.StreamResponse]]


def embedding_for(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """Deterministic unit-ish vector for ``text`` (exactly representable as float32)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i] - 128) / 128.0 for i in range(dim)]


def expected_text(name: str, model: str, echo: str) -> str:
    return f"upstream={name} model={model} echo={echo}"


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def error_body(
    message: str, err_type: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "code": code, "param": param}}


def error_response(
    status: int, message: str, err_type: str, code: str | None, param: str | None = None
) -> web.Response:
    return web.json_response(error_body(message, err_type, code, param), status=status)


class FixtureState:
    def __init__(self, name: str, models: list[str] | None) -> None:
        self.name = name
        self.models = models
        self.reset()

    def reset(self) -> None:
        self.mode = "ok"
        self.mode_count: int | None = None
        self.health_status = 200
        self.requests = 0
        self.in_flight = 0
        self.cancelled = 0
        self.completed = 0
        self.failed = 0
        self.by_path: dict[str, int] = {}
        self.last_request_headers: dict[str, str] = {}
        self.last_body: Any = None

    def take_mode(self) -> str:
        """Mode for the request now starting; consumes one unit of a counted mode."""
        mode = self.mode
        if self.mode_count is not None:
            self.mode_count -= 1
            if self.mode_count <= 0:
                self.mode = "ok"
                self.mode_count = None
        return mode

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "mode": self.mode,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "failed": self.failed,
            "by_path": dict(self.by_path),
            "last_request_headers": dict(self.last_request_headers),
            "last_body": self.last_body,
        }


STATE_KEY = web.AppKey("state", FixtureState)


def _now() -> int:
    return int(time.time())


def _last_user_message(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts
                return " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return str(prompt[-1])
    return json.dumps(prompt)


def _split_pieces(text: str, at_least: int = 3) -> list[str]:
    """Split ``text`` into stream pieces that concatenate back to ``text``."""
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    while len(pieces) < at_least:
        pieces.append("")
    return pieces


async def _sse(resp: web.StreamResponse, data: Any) -> None:
    payload = data if isinstance(data, str) else json.dumps(data)
    await resp.write(f"data: {payload}\n\n".encode())


async def _wait_forever() -> None:
    # The handler is cancelled (handler_cancellation=True) when the client goes away.
    await asyncio.Event().wait()


class Stream:
    """Builds the chunk events of one streamed answer."""

    def __init__(self, kind: str, model: str, text: str, prompt_tokens: int) -> None:
        self.kind = kind  # "chat" or "completion"
        self.model = model
        self.text = text
        self.prompt_tokens = prompt_tokens
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = _now()

    def usage(self) -> dict[str, int]:
        completion_tokens = count_tokens(self.text)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def chunk(self, piece: str, *, first: bool = False, finish: str | None = None) -> Any:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if piece or not finish:
                delta["content"] = piece
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }

    def events(self, n_pieces: int | None = None) -> list[Any]:
        if n_pieces is None:
            pieces = _split_pieces(self.text)
        else:  # slow_stream: exactly n_pieces content chunks
            pieces = [(" " if i else "") + f"t{i}" for i in range(n_pieces)]
        events = [self.chunk(p, first=(i == 0)) for i, p in enumerate(pieces)]
        events.append(self.chunk("", finish="stop"))
        return events


async def _stream_answer(
    request: web.Request, state: FixtureState, stream: Stream, body: dict[str, Any], mode: str
) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-fixture-upstream": state.name,
        },
    )
    await resp.prepare(request)
    events = stream.events(SLOW_STREAM_CHUNKS) if mode == "slow_stream" else stream.events()
    for i, event in enumerate(events):
        if mode == "die_mid_stream" and i == DIE_AFTER_CHUNKS:
            # Give the peer a moment to read what was sent, then die without a goodbye.
            await asyncio.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "slow_stream" and i > 0:
            await asyncio.sleep(SLOW_STREAM_INTERVAL_S)
        await _sse(resp, event)
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        await _sse(resp, stream.usage_chunk())
    await _sse(resp, "[DONE]")
    await resp.write_eof()
    return resp


def _check_model(state: FixtureState, body: dict[str, Any]) -> web.Response | str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error_response(
            400, "you must provide a model parameter", "invalid_request_error", None, "model"
        )
    if state.models is not None and model not in state.models:
        return error_response(
            404,
            f"fixture upstream {state.name}: the model `{model}` does not exist",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    return model


async def chat_completions(
    request: web.Request, body: dict[str, Any], mode: str
) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = _check_model(state, body)
    if isinstance(model, web.Response):
        return model
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_response(
            400,
            "'messages' must be a non-empty array",
            "invalid_request_error",
            None,
            "messages",
        )
    echo = _last_user_message(messages)
    text = expected_text(state.name, model, echo)
    prompt_tokens = sum(
        count_tokens(str(m.get("content", ""))) for m in messages if isinstance(m, dict)
    )
    stream = Stream("chat", model, text, prompt_tokens)
    if body.get("stream"):
        return await _stream_answer(request, state, stream, body, mode)
    return web.json_response(
        {
            "id": stream.id,
            "object": "chat.completion",
            "created": stream.created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": stream.usage(),
        },
        headers={"x-fixture-upstream": state.name},
    )


async def completions(request: web.Request, body: dict[str, Any], mode: str) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = _check_model(state, body)
    if isinstance(model, web.Response):
        return model
    if "prompt" not in body:
        return error_response(400, "'prompt' is required", "invalid_request_error", None, "prompt")
    echo = _prompt_text(body["prompt"])
    text = expected_text(state.name, model, echo)
    stream = Stream("completion", model, text, count_tokens(echo))
    if body.get("stream"):
        return await _stream_answer(request, state, stream, body, mode)
    return web.json_response(
        {
            "id": stream.id,
            "object": "text_completion",
            "created": stream.created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": stream.usage(),
        },
        headers={"x-fixture-upstream": state.name},
    )


async def embeddings(request: web.Request, body: dict[str, Any], mode: str) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    model = _check_model(state, body)
    if isinstance(model, web.Response):
        return model
    raw = body.get("input")
    if isinstance(raw, str):
        inputs: list[str] = [raw]
    elif isinstance(raw, list) and raw:
        inputs = [x if isinstance(x, str) else json.dumps(x) for x in raw]
    else:
        return error_response(
            400, "'input' must be a string or an array", "invalid_request_error", None, "input"
        )
    encoding = body.get("encoding_format", "float")
    data = []
    for i, text in enumerate(inputs):
        vector = embedding_for(text, int(body.get("dimensions") or EMBEDDING_DIM))
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(count_tokens(t) for t in inputs)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers={"x-fixture-upstream": state.name},
    )


def _tracked(handler: Handler, *, needs_body: bool) -> Callable[[web.Request], Awaitable[Any]]:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        state.requests += 1
        state.by_path[request.path] = state.by_path.get(request.path, 0) + 1
        state.in_flight += 1
        state.last_request_headers = {k.lower(): v for k, v in request.headers.items()}
        mode = state.take_mode()
        try:
            body: dict[str, Any] = {}
            if needs_body:
                raw = await request.read()
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    state.last_body = raw.decode(errors="replace")
                    state.failed += 1
                    return error_response(
                        400, "could not parse the JSON body", "invalid_request_error", None
                    )
                state.last_body = parsed
                if not isinstance(parsed, dict):
                    state.failed += 1
                    return error_response(
                        400, "the body must be a JSON object", "invalid_request_error", None
                    )
                body = parsed
            if mode == "error500":
                state.failed += 1
                return error_response(
                    500, f"fixture upstream {state.name}: error500 mode", "server_error", None
                )
            if mode == "hang":
                await _wait_forever()
            if mode == "drop":
                assert request.transport is not None
                request.transport.abort()
                await _wait_forever()
            resp = await handler(request, body, mode)
        except (asyncio.CancelledError, ConnectionError):
            state.cancelled += 1
            raise
        finally:
            state.in_flight -= 1
        if resp.status < 400:
            state.completed += 1
        else:
            state.failed += 1
        return resp

    return wrapper


async def list_models(request: web.Request, body: dict[str, Any], mode: str) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    models = state.models if state.models is not None else ["any"]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": state.name} for m in models
            ],
        }
    )


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    ok = 200 <= state.health_status < 300
    return web.json_response(
        {"status": "ok" if ok else "unhealthy", "name": state.name}, status=state.health_status
    )


async def _json_or_empty(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    data = json.loads(raw)
    return data if isinstance(data, dict) else {}


async def fixture_mode(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json_or_empty(request)
    mode = data.get("mode", "ok")
    if mode not in MODES:
        return web.json_response({"error": f"unknown mode {mode!r}"}, status=400)
    count = data.get("count")
    state.mode = mode
    state.mode_count = int(count) if count is not None else None
    return web.json_response({"mode": state.mode, "count": state.mode_count})


async def fixture_health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = await _json_or_empty(request)
    state.health_status = int(data.get("status", 200))
    return web.json_response({"status": state.health_status})


async def fixture_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats())


async def fixture_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


def make_app(name: str, models: list[str] | None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = FixtureState(name, models)
    app.router.add_post("/v1/chat/completions", _tracked(chat_completions, needs_body=True))
    app.router.add_post("/v1/completions", _tracked(completions, needs_body=True))
    app.router.add_post("/v1/embeddings", _tracked(embeddings, needs_body=True))
    app.router.add_get("/v1/models", _tracked(list_models, needs_body=False))
    app.router.add_get("/health", health)
    app.router.add_post("/_fixture/mode", fixture_mode)
    app.router.add_post("/_fixture/health", fixture_health)
    app.router.add_get("/_fixture/stats", fixture_stats)
    app.router.add_post("/_fixture/reset", fixture_reset)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--models", default=None, help="comma-separated; default: any model")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m] if args.models else None
    web.run_app(
        make_app(args.name, models),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.5,
    )


if __name__ == "__main__":
    main()
