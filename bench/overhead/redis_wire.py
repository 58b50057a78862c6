"""Just enough Redis for the benchmark: a private server, PING and EXISTS in RESP 2.

The benchmark looks once into Redis to be sure Bastion's limiter really went there.
"""

from __future__ import annotations

import shutil
import socket
import urllib.parse
from typing import Any

from bench.overhead.targets import Ctx, SkipTarget
from tests.support import free_port, wait_until

# Where Bastion's Redis rate limiter keeps a key's buckets (gateway/ratelimit.py).
REDIS_BUCKET_PREFIX = "bastion:rl:"


def redis_command(url: str, *args: str, timeout: float = 2.0) -> Any:
    """One command to a Redis server in its wire protocol (RESP 2); the decoded reply.
    (The script sticks to the standard library, and needs only PING and EXISTS.)"""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "redis":
        raise ValueError(f"only redis:// URLs are supported here, not {url!r}")
    commands: list[tuple[str, ...]] = []
    if u.password:
        commands.append(("AUTH", *((u.username,) if u.username else ()), u.password))
    db = u.path.strip("/")
    if db and db != "0":
        commands.append(("SELECT", db))
    commands.append(args)
    address = (u.hostname or "127.0.0.1", u.port or 6379)
    with socket.create_connection(address, timeout=timeout) as sock:
        reader = sock.makefile("rb")
        reply: Any = None
        for command in commands:
            out = [b"*%d\r\n" % len(command)]
            for arg in command:
                data = arg.encode()
                out.append(b"$%d\r\n%s\r\n" % (len(data), data))
            sock.sendall(b"".join(out))
            reply = _resp_reply(reader)
        return reply


def _resp_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"Redis answered: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_reply(reader) for _ in range(n)]
    raise OSError(f"unexpected reply from Redis: {line[:80]!r}")


def check_redis_bucket(name: str, redis_url: str, bucket: str) -> str | None:
    """After a request: None if the key's rate-limit bucket is in Redis, else the problem."""
    try:
        found = redis_command(redis_url, "EXISTS", bucket)
    except (OSError, RuntimeError, ValueError) as exc:
        return f"cannot ask Redis whether the rate limiter used it: {exc}"
    if found != 1:
        return f"no rate-limit bucket {bucket!r} in Redis after a request"
    print(f"  {name}: the key's rate-limit bucket is in Redis", flush=True)
    return None


def private_redis(ctx: Ctx) -> str:
    """A Redis server of this run's own, on the load core like the static upstream (an
    unpinned one would share the gateway's core at random); started once, kept for the
    rounds, stopped with everything else."""
    if ctx.redis_url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SkipTarget(
                "no redis-server on PATH (apt-get install redis-server), or name a running"
                " one with --redis-url redis://HOST:PORT/0"
            )
        port = free_port()
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly"]
        ctx.processes.start("redis", [*cmd, "no"], ctx.load_cpu)
        url = f"redis://127.0.0.1:{port}/0"

        def answers() -> bool:
            try:
                redis_command(url, "PING")
            except (OSError, RuntimeError, ValueError):
                return False
            return True

        try:
            wait_until(answers, 10, what=f"the private redis-server on :{port}")
        except AssertionError as exc:  # the run's failures are RuntimeErrors
            raise RuntimeError(str(exc)) from exc
        ctx.redis_url = url
        print(f"  private redis-server on :{port}, pinned with the load", flush=True)
    return ctx.redis_url
