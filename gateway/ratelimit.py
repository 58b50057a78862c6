"""Per-key rate limits: a requests bucket and a tokens bucket, checked and charged together.

* requests: capacity ``burst``, refilled at ``requests_per_second``; a request costs 1.
* tokens: capacity ``tokens_per_minute``, refilled at ``tokens_per_minute / 60`` per
  second; a request costs an estimate made from its prompt before it is forwarded. Once
  the response's usage is known, :meth:`RateLimiter.adjust` charges the difference. The
  bucket may go negative, so a key that under-estimated pays the debt back before its
  next request gets through.

:class:`MemoryRateLimiter` keeps the buckets in the process (one worker, development,
tests); :class:`RedisRateLimiter` keeps them in Redis so every gateway process shares
them. :func:`build_rate_limiter` picks one from the configuration. Callers that find
``settings.enabled`` false skip rate limiting altogether instead of asking either.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from redis.exceptions import NoScriptError

from gateway.asgi import raw_header_pairs
from gateway.config import ConfigError, RateLimitSettings, Settings
from gateway.redis_wire import PipelinedRedis, bulk
from monitors.metrics import RATELIMIT_BACKEND_ERRORS, RATELIMIT_BACKEND_UP

log = logging.getLogger("bastion.ratelimit")

DEFAULT_PREFIX = "bastion:rl:"

# Float refills leave levels like 0.9999999999 where 1 is meant; without the slack a
# request arriving exactly on time would be refused.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Limits:
    """Both buckets' capacities and refill rates (per second)."""

    request_capacity: int
    request_rate: float
    token_capacity: int
    token_rate: float
    header_lines_format: bytes = field(init=False, repr=False, compare=False)
    """The six ``x-ratelimit-*`` header lines, the limits filled in, the rest to fill."""

    def __post_init__(self) -> None:
        lines = (
            b"x-ratelimit-limit-requests: %d\r\n"
            b"x-ratelimit-remaining-requests: %%d\r\n"
            b"x-ratelimit-reset-requests: %%s\r\n"
            b"x-ratelimit-limit-tokens: %d\r\n"
            b"x-ratelimit-remaining-tokens: %%d\r\n"
            b"x-ratelimit-reset-tokens: %%s\r\n"
        ) % (self.request_capacity, self.token_capacity)
        object.__setattr__(self, "header_lines_format", lines)

    @classmethod
    def from_settings(cls, settings: RateLimitSettings) -> Limits:
        burst = settings.burst
        if burst is None:
            burst = max(1, int(settings.requests_per_second))
        return cls(
            request_capacity=burst,
            request_rate=settings.requests_per_second,
            token_capacity=settings.tokens_per_minute,
            token_rate=settings.tokens_per_minute / 60.0,
        )


class RateDecision:
    """The verdict on one request, and both buckets' levels behind OpenAI's headers.

    It keeps the levels after the check (after charging, when allowed); the figures of
    the headers are worked out only when asked for, since the request path usually
    needs nothing but ``allowed`` and :meth:`headers`.

    ``degraded`` is true when the backend could not be asked and the configured failure
    mode decided instead: allowed (open) or refused (closed). A refused degraded
    decision is an outage, not the key's fault: answer 503, not 429. Degraded decisions
    report full buckets, since the real levels are unknown.
    """

    __slots__ = ("allowed", "degraded", "limits", "need", "requests", "tokens")

    def __init__(
        self,
        limits: Limits,
        allowed: bool,
        requests: float,
        tokens: float,
        need: float,
        degraded: bool = False,
    ) -> None:
        self.limits = limits
        self.allowed = allowed
        self.requests = requests
        """The requests bucket's level."""
        self.tokens = tokens
        """The tokens bucket's level (negative while a key pays back a debt)."""
        self.need = need
        """The tokens this request needed the bucket to hold."""
        self.degraded = degraded

    @property
    def limit_requests(self) -> int:
        return self.limits.request_capacity

    @property
    def limit_tokens(self) -> int:
        return self.limits.token_capacity

    @property
    def remaining_requests(self) -> int:
        return _whole(self.requests)

    @property
    def remaining_tokens(self) -> int:
        return _whole(self.tokens)

    @property
    def reset_requests_s(self) -> float:
        """Seconds until the requests bucket is full again."""
        limits = self.limits
        return max(0.0, (limits.request_capacity - self.requests) / limits.request_rate)

    @property
    def reset_tokens_s(self) -> float:
        """Seconds until the tokens bucket is full again."""
        limits = self.limits
        return max(0.0, (limits.token_capacity - self.tokens) / limits.token_rate)

    @property
    def retry_after_s(self) -> float:
        """When refused: seconds until this request would be allowed; 0 when allowed."""
        if self.allowed:
            return 0.0
        if self.degraded:
            return 1.0  # the backend is left alone for less than that
        limits, requests, tokens, need = self.limits, self.requests, self.tokens, self.need
        return max(
            (1.0 - requests) / limits.request_rate if requests < 1.0 else 0.0,
            (need - tokens) / limits.token_rate if tokens < need else 0.0,
        )

    def header_lines(self) -> bytes:
        """OpenAI's six ``x-ratelimit-*`` headers, written out as header lines (for the
        listener's raw-headers extension, gateway.asgi.RAW_HEADERS): one format."""
        # On every answer: what _whole and format_reset do, written out (calls cost).
        limits, requests, tokens = self.limits, self.requests, self.tokens
        reset_requests = (limits.request_capacity - requests) / limits.request_rate
        ms = int(reset_requests * 1000.0 + 0.9995) if reset_requests > 0.0 else 0
        if ms <= 0:
            reset_requests_bytes = b"0s"
        elif ms < 1000:
            reset_requests_bytes = b"%dms" % ms
        else:
            reset_requests_bytes = _format_ms(ms).encode()
        reset_tokens = (limits.token_capacity - tokens) / limits.token_rate
        ms = int(reset_tokens * 1000.0 + 0.9995) if reset_tokens > 0.0 else 0
        if ms <= 0:
            reset_tokens_bytes = b"0s"
        elif ms < 1000:
            reset_tokens_bytes = b"%dms" % ms
        else:
            reset_tokens_bytes = _format_ms(ms).encode()
        return limits.header_lines_format % (
            int(requests + _EPSILON) if requests > 0.0 else 0,
            reset_requests_bytes,
            int(tokens + _EPSILON) if tokens > 0.0 else 0,
            reset_tokens_bytes,
        )

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers as pairs, plus ``retry-after`` when refused.

        ``retry-after-ms`` (read first by the official clients) goes with ``retry-after``
        so that a client waits 200 ms rather than a whole second.
        """
        headers = raw_header_pairs(self.header_lines())
        if not self.allowed:
            wait_ms = max(1, _ceil_ms(self.retry_after_s))
            headers.append((b"retry-after", b"%d" % max(1, math.ceil(wait_ms / 1000))))
            headers.append((b"retry-after-ms", b"%d" % wait_ms))
        return headers


def _whole(level: float) -> int:
    """What a header reports of a bucket's level: whole units, never below 0."""
    return int(level + _EPSILON) if level > 0.0 else 0


def _ceil_ms(seconds: float) -> int:
    """Rounded up to the millisecond, ignoring what is below a microsecond (0.07 s is
    70.00000000000001 ms, not 71)."""
    return int(seconds * 1000.0 + 0.9995) if seconds > 0.0 else 0


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI writes resets (Go's style): ``20ms``, ``1s``, ``6m0s``.

    Rounded up to the millisecond: a client waiting that long finds the bucket refilled.
    """
    return _format_ms(_ceil_ms(seconds))


def _format_ms(ms: int) -> str:
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class RateLimiter(Protocol):
    """Per-key buckets; every method is cheap enough for the request path."""

    async def check(self, key_id: str, tokens: int) -> RateDecision:
        """Take 1 request and ``tokens`` tokens, atomically, if both buckets have room.

        A refused request takes nothing from either bucket. An estimate larger than the
        whole tokens bucket is let through when the bucket is full (and drives it
        negative) rather than refused forever.
        """
        ...

    async def adjust(self, key_id: str, delta_tokens: int) -> None:
        """Charge ``delta_tokens`` more (actual usage minus the estimate; negative gives
        tokens back, never beyond the capacity). The bucket may go negative."""
        ...

    async def aclose(self) -> None: ...


class _Bucket:
    __slots__ = ("at", "requests", "tokens")

    def __init__(self, requests: float, tokens: float, at: float) -> None:
        self.requests = requests
        self.tokens = tokens
        self.at = at


class MemoryRateLimiter:
    """Buckets in this process; ``clock`` (seconds, monotonic) is injectable for tests.

    A key missing from the table has full buckets, so a key whose buckets are full again
    may be dropped. Once the table holds more than ``keep`` keys, each call looks at the
    two oldest entries, drops the full ones and moves the rest to the back: memory then
    follows the keys active in the last minute or so, not every key ever seen, at O(1)
    cost per call; below ``keep`` keys (a few hundred kilobytes) nothing is looked at.
    """

    def __init__(
        self,
        settings: RateLimitSettings,
        clock: Callable[[], float] = time.monotonic,
        keep: int = 4096,
    ) -> None:
        self.limits = Limits.from_settings(settings)
        self._clock = clock
        self._keep = keep
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict_some(self, now: float) -> None:
        buckets = self._buckets
        limits = self.limits
        for _ in range(2):
            if not buckets:
                return
            key_id = next(iter(buckets))
            bucket = buckets[key_id]
            elapsed = now - bucket.at
            if elapsed < 0.0:
                elapsed = 0.0
            if (
                bucket.requests + elapsed * limits.request_rate >= limits.request_capacity
                and bucket.tokens + elapsed * limits.token_rate >= limits.token_capacity
            ):  # full again: a missing key means full buckets
                del buckets[key_id]
            else:
                buckets.move_to_end(key_id)

    async def check(self, key_id: str, tokens: int) -> RateDecision:
        # The request path: refill, decide and charge in one function.
        now = self._clock()
        limits = self.limits
        buckets = self._buckets
        bucket = buckets.get(key_id)
        if bucket is None:
            requests = float(limits.request_capacity)
            level = float(limits.token_capacity)
        else:
            elapsed = now - bucket.at
            if elapsed < 0.0:
                elapsed = 0.0
            requests = min(limits.request_capacity, bucket.requests + elapsed * limits.request_rate)
            level = min(limits.token_capacity, bucket.tokens + elapsed * limits.token_rate)
        cost = tokens if tokens > 0 else 0
        need = min(cost, limits.token_capacity)
        allowed = requests >= 1.0 - _EPSILON and level >= need - _EPSILON
        if allowed:
            requests -= 1.0
            level -= cost
        if bucket is None:
            buckets[key_id] = _Bucket(requests, level, now)
        else:
            bucket.requests = requests
            bucket.tokens = level
            if now > bucket.at:
                bucket.at = now
        if len(buckets) > self._keep:
            self._evict_some(now)
        return RateDecision(limits, allowed, requests, level, need)

    async def adjust(self, key_id: str, delta_tokens: int) -> None:
        bucket = self._buckets.get(key_id)
        if delta_tokens == 0 or (delta_tokens < 0 and bucket is None):
            return  # nothing to charge, or tokens given back to a bucket that is full
        now = self._clock()
        limits = self.limits
        if bucket is None:
            bucket = _Bucket(limits.request_capacity, limits.token_capacity, now)
            self._buckets[key_id] = bucket
        else:  # refilled up to now first
            elapsed = now - bucket.at
            if elapsed > 0.0:
                requests = bucket.requests + elapsed * limits.request_rate
                tokens = bucket.tokens + elapsed * limits.token_rate
                bucket.requests = min(limits.request_capacity, requests)
                bucket.tokens = min(limits.token_capacity, tokens)
                bucket.at = now
        bucket.tokens = min(limits.token_capacity, bucket.tokens - delta_tokens)

    async def aclose(self) -> None:
        self._buckets.clear()


# One script does a whole check (or adjustment), so it is atomic across every gateway
# process, and it reads Redis's clock, not the callers' (which drift apart).
# KEYS[1]: the key's hash {r, t, at}. ARGV: op ("check" | "adjust"), cost (tokens; the
# delta for adjust), request capacity, request rate/s, token capacity, token rate/s, and
# the corrections (usage minus estimate) noted by this process since its last call for
# the key, applied first: corrections ride along with the next check instead of costing
# a round trip each.
# Returns {allowed (0|1), requests level, tokens level}; levels as strings, because Redis
# truncates Lua numbers to integers in replies (tostring: 14 significant digits, plenty for
# the headers). Levels are stored by passing the numbers to HSET, which writes them exactly
# (Redis 7: shortest round-trip form; 6: %.17g): string.format in Lua cost about a third of
# the script's 30 µs inside Redis.
_SCRIPT = """
local op = ARGV[1]
local cost = tonumber(ARGV[2])
local cap_r = tonumber(ARGV[3])
local rate_r = tonumber(ARGV[4])
local cap_t = tonumber(ARGV[5])
local rate_t = tonumber(ARGV[6])
local pending = tonumber(ARGV[7] or '0')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'at')
local r = tonumber(state[1])
local t = tonumber(state[2])
local at = tonumber(state[3])
if r == nil or t == nil or at == nil then
  r = cap_r
  t = cap_t
  at = now
end
-- After a failover TIME may step back: wait for it instead of refilling twice.
if now < at then now = at end
r = math.min(cap_r, r + (now - at) * rate_r)
t = math.min(cap_t, t + (now - at) * rate_t)
t = math.min(cap_t, t - pending)
if op == 'check' then
  if r >= 1 - 1e-9 and t >= math.min(cost, cap_t) - 1e-9 then
    r = r - 1
    t = t - cost
  else
    if pending ~= 0 then
      redis.call('HSET', KEYS[1], 'r', r, 't', t, 'at', now)
    end
    return {0, tostring(r), tostring(t)}
  end
else
  t = math.min(cap_t, t - cost)
end
-- Expire when both buckets are full again: a missing key means full buckets.
local ttl = math.max((cap_r - r) / rate_r, (cap_t - t) / rate_t) * 1000 + 1000
ttl = math.min(math.ceil(ttl), 86400000)
redis.call('HSET', KEYS[1], 'r', r, 't', t, 'at', now)
redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl))
return {1, tostring(r), tostring(t)}
"""
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()

_LOG_EVERY_S = 30.0


class ScriptClient(Protocol):
    """What the limiter needs of a Redis client (redis-py's ``Redis`` or ours).

    A client that also has ``send_command(command: bytes)`` (ours) is sent the EVALSHA
    as bytes, most of them encoded once: the same call for a fraction of the CPU.
    """

    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any: ...

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any: ...

    async def aclose(self) -> None: ...


FLUSH_EVERY_S = 0.25


class RedisRateLimiter:
    """Buckets in Redis, shared by every gateway process: one EVALSHA per request.

    Token corrections (:meth:`adjust`) are kept in the process and sent with the key's
    next check, or within ``FLUSH_EVERY_S`` by a background flush for keys that made no
    new request: other processes see a correction at most that late.

    It never raises: when Redis fails, ``failure_mode`` decides (``open``: allowed;
    ``closed``: refused with ``degraded=True``). After a failure Redis is left alone for
    ``backoff_s``, so a dead or black-holed server costs one timeout per ``backoff_s``,
    not one per request. Failures increment ``bastion_ratelimit_backend_errors_total``,
    set ``bastion_ratelimit_backend_up`` to 0, and log at most one warning per 30 s.
    """

    def __init__(
        self,
        settings: RateLimitSettings,
        client: ScriptClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        failure_mode: Literal["open", "closed"] | None = None,
        backoff_s: float = 0.5,
        owns_client: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = Limits.from_settings(settings)
        self.prefix = prefix
        self.failure_mode = failure_mode or settings.redis_failure_mode
        self._client = client
        self._owns_client = owns_client
        self._backoff_s = backoff_s
        self._clock = clock
        limits = self.limits
        self._limit_args = (
            b"%d" % limits.request_capacity,
            repr(limits.request_rate).encode(),
            b"%d" % limits.token_capacity,
            repr(limits.token_rate).encode(),
        )
        # EVALSHA sha 1 key op cost <the four limits> pending (11 strings): what never changes,
        # encoded once (see command()).
        self._send_command: Callable[[bytes], Awaitable[Any]] | None = getattr(
            client, "send_command", None
        )
        self._command_head = b"*11\r\n" + bulk(b"EVALSHA") + bulk(_SCRIPT_SHA.encode()) + bulk(b"1")
        self._command_limits = b"".join(bulk(arg) for arg in self._limit_args)
        self._ops = {b"check": bulk(b"check"), b"adjust": bulk(b"adjust")}
        self._fallback = RateDecision(
            limits,
            allowed=self.failure_mode == "open",
            requests=limits.request_capacity,
            tokens=limits.token_capacity,
            need=0,
            degraded=True,
        )
        self._pending: dict[str, int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._up: bool | None = None
        self._skip_until = 0.0
        self._next_log_at = 0.0
        self._errors_unlogged = 0

    @classmethod
    def from_url(
        cls,
        settings: RateLimitSettings,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 0.25,
    ) -> RedisRateLimiter:
        """A limiter with its own pipelined connection (gateway/redis_wire.py) and short
        timeouts: on the request path a quick degraded answer beats a late exact one."""
        return cls(settings, PipelinedRedis(url, timeout_s), prefix=prefix, owns_client=True)

    async def _call(
        self, op: bytes, key_id: str, cost: int, pending: int = 0
    ) -> tuple[bool, float, float] | None:
        """Run the script: (allowed, requests level, tokens level), or None on failure."""
        if self._skip_until and self._clock() < self._skip_until:
            return None
        key = self.prefix + key_id
        try:
            try:
                if self._send_command is not None:
                    reply = await self._send_command(self.command(op, key, cost, pending))
                else:
                    args = (key, op, cost, *self._limit_args, pending)
                    reply = await self._client.evalsha(_SCRIPT_SHA, 1, *args)
            except NoScriptError:
                # First use on this server, or it restarted: EVAL runs and caches it.
                args = (key, op, cost, *self._limit_args, pending)
                reply = await self._client.eval(_SCRIPT, 1, *args)
            allowed, requests, tokens = reply
            result = (allowed == 1, float(requests), float(tokens))
        except Exception as exc:
            # The contract is to never raise: a Redis outage and a surprise alike are
            # answered by the failure mode, counted and logged, not turned into 500s.
            self._failed(exc)
            return None
        if self._up is not True or self._skip_until:
            self._succeeded()
        return result

    def command(self, op: bytes, key: str, cost: int, pending: int) -> bytes:
        """The script's EVALSHA in RESP, as ``encode_command`` would write it."""
        key_bytes = key.encode()
        cost_bytes = b"%d" % cost
        pending_bytes = b"%d" % pending
        return b"%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n" % (
            self._command_head,
            len(key_bytes),
            key_bytes,
            self._ops[op],
            len(cost_bytes),
            cost_bytes,
            self._command_limits,
            len(pending_bytes),
            pending_bytes,
        )

    def _failed(self, exc: Exception) -> None:
        now = self._clock()
        self._skip_until = now + self._backoff_s
        RATELIMIT_BACKEND_ERRORS.inc()
        if self._up is not False:
            self._up = False
            RATELIMIT_BACKEND_UP.labels(backend="redis").set(0)
        self._errors_unlogged += 1
        if now >= self._next_log_at:
            # No key ids, no URL (it may hold a password): the error's type and text only.
            log.warning(
                "rate-limit backend failed (%s: %s); failing %s; %d error(s) since last report",
                type(exc).__name__,
                exc,
                self.failure_mode,
                self._errors_unlogged,
            )
            self._errors_unlogged = 0
            self._next_log_at = now + _LOG_EVERY_S

    def _succeeded(self) -> None:
        if self._up is not True:
            if self._up is False:
                log.warning("rate-limit backend reachable again")
            self._up = True
            RATELIMIT_BACKEND_UP.labels(backend="redis").set(1)
        self._skip_until = 0.0

    async def check(self, key_id: str, tokens: int) -> RateDecision:
        cost = max(0, tokens)
        pending = self._pending.pop(key_id, 0)
        result = await self._call(b"check", key_id, cost, pending)
        if result is None:
            if pending:
                self._note(key_id, pending)  # not applied: keep it for later
            return self._fallback
        allowed, requests, level = result
        limits = self.limits
        return RateDecision(limits, allowed, requests, level, min(cost, limits.token_capacity))

    async def adjust(self, key_id: str, delta_tokens: int) -> None:
        if delta_tokens != 0:
            self._note(key_id, delta_tokens)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_soon())

    def _note(self, key_id: str, delta_tokens: int) -> None:
        self._pending[key_id] = self._pending.get(key_id, 0) + delta_tokens

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_EVERY_S)
        await self.flush()

    async def flush(self) -> None:
        """Send every correction no check has carried yet."""
        pending, self._pending = self._pending, {}
        await asyncio.gather(
            *(self._call(b"adjust", key_id, delta) for key_id, delta in pending.items() if delta)
        )

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()
        if self._owns_client:
            await self._client.aclose()


def build_rate_limiter(settings: RateLimitSettings, redis_url: str | None) -> RateLimiter:
    """Redis-backed buckets when a Redis URL is configured, else in-process ones."""
    if redis_url:
        return RedisRateLimiter.from_url(settings, redis_url, timeout_s=settings.redis_timeout_s)
    return MemoryRateLimiter(settings)


class RateLimitsPerWorker(ConfigError):
    """In-memory rate limits asked of several worker processes."""


def check_workers_rate_limits(settings: Settings, workers: int) -> None:
    """Refuse a start whose rate limits would silently multiply.

    :class:`MemoryRateLimiter` keeps its buckets in each process: with ``workers``
    processes and no Redis a key would get ``workers`` times its configured rate (a
    measured 195 answers in 10 s where the bucket allows 110, with two workers). Limits
    that hold across processes need Redis (``BASTION_REDIS_URL``).
    """
    if workers > 1 and settings.rate_limits.enabled and not settings.redis_url:
        raise RateLimitsPerWorker(
            f"server.workers is {workers} but rate limits are kept in memory, per worker: "
            f"each key would get {workers} times its limit. Set BASTION_REDIS_URL (shared "
            "limits), run one worker, or set rate_limits.enabled: false."
        )
