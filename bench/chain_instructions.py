"""What does the access chain cost, counted in CPU instructions instead of timed?

On a noisy machine a 20 % throughput target drowns in the spread between rounds (the
proxy benchmark's rounds of the same target differ by up to half). Instructions executed
do not depend on what else runs, so this counts them: each variant serves N requests in
one process under valgrind's callgrind, then N2, and the difference divided by N2 - N is
its instructions per request, start-up excluded. Everything is in process: uvicorn's
httptools protocol as `bastion serve` runs it (gateway.listener.ListenerProtocol) over a
socket that only records what is written, the whole BastionApp, and an upstream that
answers a fixed chat completion at no cost (bench/gateway_hotpath.py). So what is counted
is the gateway's own code per request, HTTP parsing and writing included; not counted:
the kernel, TLS (a fake socket cannot carry it) and, for Redis, the server's side.

    apt-get install -y valgrind
    .venv/bin/python bench/chain_instructions.py [--requests 200,700] [--redis-url URL]
        [--concurrency 32]

With ``--concurrency K`` there are K connections, and each turn hands every one of them a
request before waiting for the answers, as wrk's K connections do: what a load of K
requests in flight costs (the Redis checks of one turn share a write, the collector sees
K requests' objects alive at once).

Variants: ``bare`` (dev, no auth, no rate limits), ``bastion`` (API key, in-memory rate
limits that never throttle, x-ratelimit headers) and ``bastion-redis`` (API key, model
allow-lists for the role and the key, rate limits in Redis); each variant's cost is
``1 - bare / variant``, the share of throughput it costs a CPU-bound gateway. About
3 minutes, two variants at a time. Instruction counts are not time (a cache miss costs
more than an add): compare them with proxy_overhead.py's figures, not instead of them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

VARIANTS = ("bare", "bastion", "bastion-redis")
MODEL = "m1"


def settings_for(variant: str, workdir: Path, redis_url: str) -> Any:
    from gateway.config import Settings

    never_throttle = {"requests_per_second": 1e9, "burst": 10**9, "tokens_per_minute": 10**12}
    common: dict[str, Any] = {
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": [MODEL]}],
        "database_url": f"sqlite:///{workdir / 'bastion.db'}",
        "health_check": {"enabled": False},
        "audit": {"enabled": False},
        "master_key": base64.b64encode(b"b" * 32).decode(),
        # No refresh during the count: its thread would add work that depends on time.
        "auth": {"key_refresh_s": 3600},
    }
    if variant == "bare":
        common.update(dev=True, auth={"enabled": False}, rate_limits={"enabled": False})
    elif variant == "bastion":
        common["rate_limits"] = never_throttle
    else:
        common["auth"]["role_models"] = {"app": [MODEL]}
        common["rate_limits"] = {**never_throttle, "redis_failure_mode": "closed"}
        common["redis_url"] = redis_url
    return Settings(**common)


class RecordingSocket(asyncio.Transport):
    """Keeps what the protocol writes; wakes the driver when an answer is complete."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def serve(variant: str, requests: int, redis_url: str, concurrency: int) -> None:
    """Serve ``requests`` requests in process (what valgrind counts)."""
    import uvicorn
    from gateway_hotpath import REQUEST, ZeroCostUpstream
    from uvicorn.server import ServerState

    from gateway.app import BastionApp
    from gateway.listener import ListenerProtocol

    with tempfile.TemporaryDirectory() as tmp:
        app = BastionApp(settings_for(variant, Path(tmp), redis_url), ZeroCostUpstream())
        lifespan = app._lifespan(app)
        await lifespan.__aenter__()
        try:
            key = "none"
            if app.settings.auth.enabled:
                models = [MODEL] if variant == "bastion-redis" else None
                key, _ = app.key_store.create(["app"], models=models)
                app.key_cache.load()
            config = uvicorn.Config(app, http=ListenerProtocol, lifespan="off", access_log=False)
            config.load()
            loop = asyncio.get_running_loop()
            request = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
                b"Content-Type: application/json\r\nAccept: application/json\r\n"
                b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                % (key.encode(), len(REQUEST), REQUEST)
            )
            # One connection per concurrent request, as wrk's; each turn hands every
            # connection its next request and waits for all the answers.
            state = ServerState()
            connections = []
            for _ in range(concurrency):
                protocol = ListenerProtocol(config, state, {}, loop)
                socket = RecordingSocket()
                protocol.connection_made(socket)
                connections.append((protocol, socket))
            for _ in range(requests // concurrency):
                for protocol, socket in connections:
                    socket.answered = loop.create_future()
                    protocol.data_received(request)
                for _, socket in connections:
                    await socket.answered
                    answer = b"".join(socket.written)
                    socket.written.clear()
                    if not answer.startswith(b"HTTP/1.1 200 "):
                        raise SystemExit(f"{variant}: not a 200: {answer[:300]!r}")
            for protocol, _ in connections:
                protocol.connection_lost(None)
        finally:
            await lifespan.__aexit__(None, None, None)


def count(variant: str, requests: int, redis_url: str, concurrency: int) -> int:
    """Instructions executed by a whole process serving ``requests`` requests."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])])
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/callgrind.out",
                sys.executable,
                __file__,
                "--serve",
                variant,
                str(requests),
                "--redis-url",
                redis_url,
                "--concurrency",
                str(concurrency),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{variant} ({requests} requests) failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="200,700", help="N,N2: requests per count")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once, each on a connection of its own (wrk's -c)",
    )
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve[0], int(args.serve[1]), args.redis_url, args.concurrency))
        return
    if shutil.which("valgrind") is None:
        sys.exit("chain_instructions: valgrind is missing (apt-get install -y valgrind)")
    # Whole turns only: each turn serves one request per connection.
    low, high = (int(n) // args.concurrency * args.concurrency for n in args.requests.split(","))
    variants = args.variants.split(",")
    jobs = [(v, n) for v in variants for n in (low, high)]
    print(f"counting {len(jobs)} processes under callgrind, two at a time...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = pool.map(lambda job: count(*job, args.redis_url, args.concurrency), jobs)
        totals = dict(zip(jobs, counted, strict=True))
    per_request = {v: (totals[v, high] - totals[v, low]) / (high - low) for v in variants}
    print(
        f"\ninstructions per request (({high} - {low}) requests, {args.concurrency} at a time,"
        " in process, no TLS)"
    )
    base = per_request.get("bare")
    for variant, instructions in per_request.items():
        cost = ""
        if base and variant != "bare":
            cost = f"+{instructions - base:,.0f}  cost {1 - base / instructions:.1%}"
        print(f"  {variant:<14} {instructions:>10,.0f}  {cost}")
    print(json.dumps({"instructions_per_request": per_request}))


if __name__ == "__main__":
    main()
