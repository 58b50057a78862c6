"""How much of a request is Bastion's own Python code? (no network, no uvicorn)

Drives BastionApp directly as an ASGI app, in process, on uvloop, with an upstream
transport that answers a fixed chat completion at no cost, so what is timed is only the
gateway's code: middleware, routing, checks, admission, forwarding logic. Three
configurations side by side from one run: the bare proxy, with API-key authentication,
and with in-memory rate limits too. The best of several rounds is printed (noise only
ever adds time).

    .venv/bin/python bench/gateway_hotpath.py [--requests 10000] [--rounds 5]

Not run by CI. For the whole picture (uvicorn, sockets, TLS, Redis) use proxy_overhead.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import time
from typing import Any

import uvloop

from gateway.app import BastionApp
from gateway.asgi import Message
from gateway.config import Settings
from gateway.store import migrate

ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m1","choices":'
    b'[{"index":0,"message":{"role":"assistant","content":"Hello there, how can I help you'
    b' today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":10,'
    b'"total_tokens":19}}'
)
REQUEST = b'{"model":"m1","messages":[{"role":"user","content":"hi"}]}'


class _FixedAnswer:
    status = 200
    content_type = "application/json"

    async def read(self) -> bytes:
        return ANSWER

    async def close(self) -> None:
        pass


class ZeroCostUpstream:
    """A measuring device, not an upstream: answers at once, so only gateway code is timed."""

    async def send(self, method: str, url: str, headers: Any, body: Any) -> _FixedAnswer:
        return _FixedAnswer()

    async def aclose(self) -> None:
        pass


def settings_for(variant: str) -> Settings:
    common: dict[str, Any] = {
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        "database_url": "sqlite://",
        "health_check": {"enabled": False},
        "master_key": base64.b64encode(os.urandom(32)).decode(),
    }
    if variant == "bare":
        common.update(dev=True, auth={"enabled": False}, rate_limits={"enabled": False})
    elif variant == "keys":
        common.update(rate_limits={"enabled": False})
    else:
        limits = {"requests_per_second": 1e9, "burst": 10**9, "tokens_per_minute": 10**12}
        common.update(rate_limits={"enabled": True, **limits})
    return Settings(**common)


async def measure(variant: str, requests: int, rounds: int) -> float:
    app = BastionApp(settings_for(variant), transport=ZeroCostUpstream())
    migrate(app.engine)
    key, _ = app.key_store.create(["app"])
    app.key_cache.load()
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(REQUEST)).encode()),
        (b"authorization", b"Bearer " + key.encode()),
    ]
    never = asyncio.Event()

    async def one() -> None:
        delivered = False
        status = 0

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": REQUEST, "more_body": False}
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": headers,
            "root_path": "",
            "scheme": "http",
            "server": ("bench", 80),
            "client": ("bench", 1),
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        await app(scope, receive, send)
        assert status == 200, status

    for _ in range(requests // 3):
        await one()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            await one()
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    app.engine.dispose()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {
        v: uvloop.run(measure(v, args.requests, args.rounds)) for v in ("bare", "keys", "full")
    }
    print(f"\nBastion's own code per request (best of {args.rounds} x {args.requests}, uvloop)")
    labels = {
        "bare": "bare proxy (dev, no auth, no rate limits)",
        "keys": "+ API key check and RBAC",
        "full": "+ in-memory rate limits (and x-ratelimit headers)",
    }
    for variant, micros in results.items():
        extra = micros - results["bare"]
        delta = f"(+{extra:.1f} µs)" if variant != "bare" else ""
        print(f"  {labels[variant]:<52} {micros:7.1f} µs {delta}")


if __name__ == "__main__":
    main()
