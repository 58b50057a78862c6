"""API keys: their format, how they are hashed, stored, cached and checked.

A key reads ``bst_<id>_<secret>``: a 16-hex-digit public id (how the key is found and
named in logs and audit) and a 256-bit random secret (43 base64url characters).

Only ``HMAC-SHA256(pepper, id || secret)`` is stored. Why not argon2 or bcrypt: those
slow hashes protect *guessable* passwords; a 256-bit random secret cannot be guessed
however fast the hash, and a per-request argon2 would cost milliseconds on the hot path.
The HMAC costs about a microsecond, the id salts it, and the pepper (derived from the
master key, never stored in the database) means a stolen database alone does not even
allow checking a candidate key offline. Comparison is constant-time.

Each gateway process keeps every key in memory (:class:`KeyCache`) and re-reads rows
changed since its last look every ``auth.key_refresh_s``: a revocation made by any
process (CLI, admin API) takes effect everywhere within that time. A well-formed key whose
id the cache does not hold yet (made a moment ago by ``bastion keys create`` or another
worker) is looked up in the store at once (:meth:`KeyCache.check_missing`): one query per
id however many requests carry it, ids found absent remembered for
``NEGATIVE_TTL_S``, and at most ``LOOKUPS_PER_S`` queries a second in all, so a flood of
made-up keys cannot become database load.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from hashlib import blake2b

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import func

from gateway.config import ROLES
from gateway.errors import ServiceUnavailable
from gateway.rbac import Principal
from gateway.store import ApiKeyRow

log = logging.getLogger("bastion.keys")

KEY_PATTERN = re.compile(r"bst_([0-9a-f]{16})_([A-Za-z0-9_\-]{43})")
# Rows changed this long before the newest change seen are read again: a transaction
# that committed late with an earlier timestamp is still picked up.
REFRESH_OVERLAP = timedelta(seconds=5)
VERIFIED_CACHE_SIZE = 10_000
UNKNOWN_KEY = "unknown API key"
"""The reason :meth:`KeyCache.check` gives for a key it does not know (yet)."""
LOOKUPS_PER_S = 10.0
"""Store lookups of ids missing from the cache, per second and process (a burst as large)."""
NEGATIVE_TTL_S = 60.0
"""How long an id found in no row is answered "unknown" without asking the store again."""
NEGATIVE_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a key grants, without its secret."""

    id: str
    roles: tuple[str, ...]
    subject_id: str | None
    models: tuple[str, ...] | None
    tier: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def as_json(self) -> dict[str, object]:
        def when(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "roles": list(self.roles),
            "subject": self.subject_id,
            "models": list(self.models) if self.models is not None else None,
            "tier": self.tier,
            "description": self.description,
            "created_at": when(self.created_at),
            "expires_at": when(self.expires_at),
            "revoked_at": when(self.revoked_at),
        }

    def as_audit_json(self) -> dict[str, object]:
        """What the audit log's clear metadata says of a key: :meth:`as_json` without the
        subject it acts for, which is personal data (one rule for the CLI and the API)."""
        return {k: v for k, v in self.as_json().items() if k != "subject"}


@dataclass(frozen=True, slots=True)
class CachedKey:
    info: KeyInfo
    secret_hash: bytes
    principal: Principal
    expires_ts: float | None = field(default=None)

    @classmethod
    def of(cls, info: KeyInfo, secret_hash: bytes) -> CachedKey:
        principal = Principal(
            key_id=info.id,
            roles=frozenset(info.roles),
            subject_id=info.subject_id,
            models=frozenset(info.models) if info.models is not None else None,
            tier=info.tier,
        )
        expires = info.expires_at.timestamp() if info.expires_at else None
        return cls(info, secret_hash, principal, expires)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _info(row: ApiKeyRow) -> KeyInfo:
    created = _utc(row.created_at)
    assert created is not None
    return KeyInfo(
        id=row.id,
        roles=tuple(row.roles),
        subject_id=row.subject_id,
        models=tuple(row.models) if row.models is not None else None,
        tier=row.tier,
        description=row.description,
        created_at=created,
        expires_at=_utc(row.expires_at),
        revoked_at=_utc(row.revoked_at),
    )


class KeyHasher:
    def __init__(self, pepper: bytes) -> None:
        self._pepper = pepper

    def hash(self, key_id: str, secret: str) -> bytes:
        return hmac.digest(self._pepper, f"{key_id}:{secret}".encode(), "sha256")

    def matches(self, key_id: str, secret: str, stored: bytes) -> bool:
        return hmac.compare_digest(self.hash(key_id, secret), stored)


def parse_key(presented: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    match = KEY_PATTERN.fullmatch(presented)
    return (match.group(1), match.group(2)) if match else None


class KeyStore:
    """Keys in the SQL store (synchronous; called from threads on the event loop's side)."""

    def __init__(self, engine: Engine, hasher: KeyHasher) -> None:
        self.engine = engine
        self._engine = engine
        self._hasher = hasher

    def create(
        self,
        roles: Iterable[str],
        subject_id: str | None = None,
        models: Iterable[str] | None = None,
        tier: str = "standard",
        expires_in: timedelta | None = None,
        description: str = "",
    ) -> tuple[str, KeyInfo]:
        """Make a key; return ``(the key, its info)``. The key is not kept anywhere."""
        roles = tuple(dict.fromkeys(roles))
        unknown = [r for r in roles if r not in ROLES]
        if not roles or unknown:
            raise ValueError(f"unknown role {unknown[0]!r}" if unknown else "at least one role")
        key_id = os.urandom(8).hex()
        secret = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        now = datetime.now(UTC)
        row = ApiKeyRow(
            id=key_id,
            secret_hash=self._hasher.hash(key_id, secret),
            roles=list(roles),
            subject_id=subject_id,
            models=list(models) if models is not None else None,
            tier=tier,
            description=description,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
            revoked_at=None,
        )
        with Session(self._engine) as session, session.begin():
            session.add(row)
            session.flush()
            info = _info(row)
        return f"bst_{key_id}_{secret}", info

    def all(self, include_revoked: bool = False) -> list[KeyInfo]:
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with Session(self._engine) as session:
            return [_info(row) for row in session.scalars(query)]

    def revoke(self, key_id: str) -> KeyInfo | None:
        """Revoke a key (idempotent); None if there is no such key."""
        with Session(self._engine) as session, session.begin():
            session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC), updated_at=func.now())
            )
            row = session.get(ApiKeyRow, key_id)
            return _info(row) if row is not None else None

    def get(self, key_id: str) -> CachedKey | None:
        """One key by its id, revoked or not; None when there is no such row."""
        with Session(self._engine) as session:
            row = session.get(ApiKeyRow, key_id)
            return CachedKey.of(_info(row), row.secret_hash) if row is not None else None

    def changed_since(self, since: datetime | None) -> tuple[list[CachedKey], datetime | None]:
        """Keys changed at or after ``since`` (all when None), and the newest change seen."""
        query = select(ApiKeyRow)
        if since is not None:
            query = query.where(ApiKeyRow.updated_at >= since - REFRESH_OVERLAP)
        newest = since
        keys = []
        with Session(self._engine) as session:
            for row in session.scalars(query):
                keys.append(CachedKey.of(_info(row), row.secret_hash))
                updated = _utc(row.updated_at)
                if updated is not None and (newest is None or updated > newest):
                    newest = updated
        return keys, newest


class KeyCache:
    """Every key in memory, refreshed from the store in the background."""

    def __init__(
        self,
        store: KeyStore,
        hasher: KeyHasher,
        refresh_s: float,
        *,
        lookups_per_s: float = LOOKUPS_PER_S,
        negative_ttl_s: float = NEGATIVE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._refresh_s = refresh_s
        self._keys: dict[str, CachedKey] = {}
        self._verified: dict[bytes, CachedKey] = {}
        self._newest: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        # Lookups of ids missing from the cache: in flight (one per id), found absent
        # (id -> until when), and a token bucket of lookups.
        self._lookups: dict[str, asyncio.Future[CachedKey | None]] = {}
        self._absent: dict[str, float] = {}
        self._lookup_rate = lookups_per_s
        self._lookup_tokens = lookups_per_s
        self._lookup_at = clock()
        self._negative_ttl_s = negative_ttl_s
        self._clock = clock
        self.lookups = 0
        """Store lookups made for missing ids (tests, curiosity)."""

    def load(self) -> None:
        keys, self._newest = self._store.changed_since(None)
        self._keys = {k.info.id: k for k in keys}

    def put(self, key: CachedKey) -> None:
        self._keys[key.info.id] = key

    async def refresh(self) -> None:
        keys, newest = await asyncio.to_thread(self._store.changed_since, self._newest)
        for key in keys:
            self._keys[key.info.id] = key
        self._newest = newest

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # the store may be briefly unreachable; keep the cache
                log.exception("refreshing API keys failed; keeping the cached keys")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bastion-key-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def check(self, presented: str, now: float) -> Principal | str:
        """The key's principal if it is valid now, else a reason (for the 401 message)."""
        # A key verified before against the same cache entry is not verified again: in
        # the request path OpenSSL's HMAC set-up costs about 10 µs, BLAKE2b (built into
        # Python) about half a microsecond. Memory holds BLAKE2b digests of keys in use,
        # never the keys; a refreshed entry is a new object, so it is verified anew.
        fingerprint = blake2b(presented.encode(), digest_size=32).digest()
        cached = self._verified.get(fingerprint)
        if cached is None or self._keys.get(cached.info.id) is not cached:
            parsed = parse_key(presented)
            if parsed is None:
                return "malformed API key"
            key_id, secret = parsed
            cached = self._keys.get(key_id)
            if cached is None or not self._hasher.matches(key_id, secret, cached.secret_hash):
                return UNKNOWN_KEY
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[fingerprint] = cached
        if cached.info.revoked_at is not None:
            return "revoked API key"
        if cached.expires_ts is not None and now >= cached.expires_ts:
            return "expired API key"
        return cached.principal

    # ASCII digits only: ``\d`` would take "٣" (Arabic-Indic three) and the like.
    async def check_missing(self, presented: str, now: float) -> Principal | str:
        """:meth:`check` for a key it called unknown: if the key's id is not in the cache,
        look it up in the store (single flight per id, absent ids remembered, lookups
        capped per second), then check again."""
        parsed = parse_key(presented)
        if parsed is None or parsed[0] in self._keys:
            return self.check(presented, now)  # malformed, or a wrong secret
        found = await self._lookup(parsed[0])
        if found is None:
            return UNKNOWN_KEY
        return self.check(presented, now)

    async def _lookup(self, key_id: str) -> CachedKey | None:
        pending = self._lookups.get(key_id)
        if pending is None:
            now = self._clock()
            until = self._absent.get(key_id)
            if until is not None:
                if until > now:
                    return None
                del self._absent[key_id]
            if not self._take_lookup(now):
                return None  # over the cap: unknown for now, the periodic refresh catches up
            # A task of its own: a requester that goes away does not cancel the others' answer.
            pending = self._lookups[key_id] = asyncio.ensure_future(self._fetch(key_id))
        return await asyncio.shield(pending)

    async def _fetch(self, key_id: str) -> CachedKey | None:
        try:
            self.lookups += 1
            found = await asyncio.to_thread(self._store.get, key_id)
        except Exception as exc:
            log.warning("looking up an API key failed (%s)", type(exc).__name__)
            raise ServiceUnavailable("The key store cannot be reached; try again.") from exc
        finally:
            del self._lookups[key_id]
        if found is None:
            if len(self._absent) >= NEGATIVE_CACHE_SIZE:
                self._absent.clear()
            self._absent[key_id] = self._clock() + self._negative_ttl_s
        elif key_id not in self._keys:  # a refresh may have brought it meanwhile
            self._keys[key_id] = found
        return found

    def _take_lookup(self, now: float) -> bool:
        """A token bucket: ``lookups_per_s`` a second, as many at once."""
        rate = self._lookup_rate
        self._lookup_tokens = min(rate, self._lookup_tokens + (now - self._lookup_at) * rate)
        self._lookup_at = now
        if self._lookup_tokens < 1:
            return False
        self._lookup_tokens -= 1
        return True


_DURATION = re.compile(r"([0-9]+)(s|m|h|d|w)")
MAX_DURATION = timedelta(days=100 * 366)
"""The longest duration accepted: anything longer would overflow a date (year 9999)."""
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``"90d"``, ``"12h"``, ``"1w2d"`` -> a timedelta; ValueError when malformed."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m, 1w)")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"a duration must be at most {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)
