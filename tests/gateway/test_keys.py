"""API keys: format, hashing, the SQL store (SQLite and PostgreSQL) and the in-memory cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from gateway.keys import KeyCache, KeyHasher, KeyStore, parse_duration, parse_key
from gateway.rbac import Principal
from gateway.store import ApiKeyRow, make_engine, migrate

PEPPER = b"p" * 32


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    migrate(engine)  # idempotent
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> KeyStore:
    return KeyStore(engine, KeyHasher(PEPPER))


def test_key_format_and_parsing() -> None:
    assert parse_key("bst_0123456789abcdef_" + "A" * 43) == ("0123456789abcdef", "A" * 43)
    for bad in [
        "",
        "sk-123",
        "bst_0123_" + "A" * 43,
        "bst_0123456789abcdef_short",
        "bst_0123456789ABCDEF_" + "A" * 43,
        "bst_0123456789abcdef_" + "A" * 44,
    ]:
        assert parse_key(bad) is None, bad


def test_only_a_peppered_hash_is_stored(store: KeyStore, engine: Engine) -> None:
    key, info = store.create(["app"], subject_id="alice", models=["m1"], tier="batch")
    key_id, secret = parse_key(key)  # type: ignore[misc]
    assert key_id == info.id
    with engine.connect() as connection:
        row = connection.execute(select(ApiKeyRow)).one()
    assert secret.encode() not in row.secret_hash and len(row.secret_hash) == 32
    assert KeyHasher(PEPPER).matches(key_id, secret, row.secret_hash)
    assert not KeyHasher(b"q" * 32).matches(key_id, secret, row.secret_hash)
    assert (info.roles, info.subject_id, info.models, info.tier) == (
        ("app",),
        "alice",
        ("m1",),
        "batch",
    )


def test_lifecycle_create_use_revoke(store: KeyStore) -> None:
    cache = KeyCache(store, KeyHasher(PEPPER), refresh_s=1)
    key, info = store.create(["app", "data_scientist"])
    cache.load()
    checked = cache.check(key, time.time())
    assert isinstance(checked, Principal) and checked.roles == {"app", "data_scientist"}
    assert checked.key_id == info.id
    assert [k.id for k in store.all()] == [info.id]
    revoked = store.revoke(info.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert store.revoke(info.id) is not None  # idempotent
    assert store.revoke("ffffffffffffffff") is None
    assert store.all() == [] and [k.id for k in store.all(include_revoked=True)] == [info.id]
    cache.load()
    assert cache.check(key, time.time()) == "revoked API key"


def test_wrong_secret_unknown_and_malformed(store: KeyStore) -> None:
    cache = KeyCache(store, KeyHasher(PEPPER), refresh_s=1)
    key, _ = store.create(["app"])
    cache.load()
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert cache.check(tampered, time.time()) == "unknown API key"
    assert cache.check("bst_0000000000000000_" + "A" * 43, time.time()) == "unknown API key"
    assert cache.check("Bearer nonsense", time.time()) == "malformed API key"


def test_expiry(store: KeyStore) -> None:
    cache = KeyCache(store, KeyHasher(PEPPER), refresh_s=1)
    key, info = store.create(["app"], expires_in=timedelta(hours=1))
    cache.load()
    assert info.expires_at is not None
    assert isinstance(cache.check(key, time.time()), Principal)
    assert cache.check(key, info.expires_at.timestamp() + 1) == "expired API key"


async def test_revocation_reaches_another_process_within_the_refresh(engine: Engine) -> None:
    """Two caches on one database stand for two gateway processes."""
    hasher = KeyHasher(PEPPER)
    writer, reader = KeyStore(engine, hasher), KeyCache(KeyStore(engine, hasher), hasher, 0.05)
    key, info = writer.create(["app"])
    reader.load()
    assert isinstance(reader.check(key, time.time()), Principal)
    reader.start()
    try:
        writer.revoke(info.id)
        deadline = time.monotonic() + 1.0
        while isinstance(reader.check(key, time.time()), Principal):
            assert time.monotonic() < deadline, "revocation not seen within a second"
            await asyncio.sleep(0.02)
        new_key, _ = writer.create(["auditor"])
        deadline = time.monotonic() + 1.0
        while not isinstance(reader.check(new_key, time.time()), Principal):
            assert time.monotonic() < deadline, "new key not seen within a second"
            await asyncio.sleep(0.02)
    finally:
        await reader.stop()


def test_unknown_role_is_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        store.create(["root"])
    with pytest.raises(ValueError):
        store.create([])


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("1w2d", 777600)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "10", "d", "-5d", "0s", "5y", "3d garbage"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_verified_keys_are_remembered_without_weakening_checks(store: KeyStore) -> None:
    cache = KeyCache(store, KeyHasher(PEPPER), refresh_s=1)
    key, info = store.create(["app"], expires_in=timedelta(hours=1))
    cache.load()
    for _ in range(3):  # the second and third are answered from the verified memo
        assert isinstance(cache.check(key, time.time()), Principal)
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert cache.check(tampered, time.time()) == "unknown API key"
    assert info.expires_at is not None
    assert cache.check(key, info.expires_at.timestamp() + 1) == "expired API key"
    store.revoke(info.id)
    cache.load()  # a refreshed entry is a new object: verified anew, and refused
    assert cache.check(key, time.time()) == "revoked API key"


# --- keys missing from the cache (issue 14, item 15) --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def api_key_queries(engine: Engine) -> list[str]:
    """Every statement the engine runs against ``api_keys`` from now on."""
    from sqlalchemy import event

    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "api_keys" in statement:
            seen.append(statement)

    return seen


def random_key() -> str:
    import os as _os

    return f"bst_{_os.urandom(8).hex()}_" + "A" * 43


async def test_a_key_made_after_the_cache_loaded_works_at_once(
    store: KeyStore, engine: Engine
) -> None:
    cache = KeyCache(store, KeyHasher(PEPPER), refresh_s=3600)
    cache.load()
    key, _ = store.create(["app"])
    assert cache.check(key, time.time()) == "unknown API key"  # the cache alone
    queries = api_key_queries(engine)
    # Fifty requests at once with the new key: one store query between them.
    checked = await asyncio.gather(*(cache.check_missing(key, time.time()) for _ in range(50)))
    assert all(isinstance(p, Principal) and p.roles == {"app"} for p in checked)
    assert len(queries) == 1 and cache.lookups == 1
    assert isinstance(cache.check(key, time.time()), Principal)  # cached from now on
    # A wrong secret for a known id is not looked up again.
    wrong = key[:-1] + ("B" if key[-1] != "B" else "C")
    assert await cache.check_missing(wrong, time.time()) == "unknown API key"
    assert len(queries) == 1
    # A revoked key found in the store is refused as revoked.
    other, info = store.create(["app"])
    store.revoke(info.id)
    assert await cache.check_missing(other, time.time()) == "revoked API key"


async def test_a_flood_of_made_up_keys_adds_at_most_the_capped_queries(
    store: KeyStore, engine: Engine
) -> None:
    clock = Clock()
    cache = KeyCache(
        store, KeyHasher(PEPPER), refresh_s=3600, lookups_per_s=10, negative_ttl_s=60, clock=clock
    )
    cache.load()
    queries = api_key_queries(engine)
    flood = [random_key() for _ in range(500)]
    answers = await asyncio.gather(*(cache.check_missing(k, 0) for k in flood))
    assert set(answers) == {"unknown API key"}
    assert len(queries) == 10  # the burst
    # The same ids again: remembered as absent, or still over the cap: no query.
    await asyncio.gather(*(cache.check_missing(k, 0) for k in flood))
    assert len(queries) == 10
    clock.now += 1.0  # a second later: ten more at most
    await asyncio.gather(*(cache.check_missing(random_key(), 0) for _ in range(100)))
    assert len(queries) == 20
    # The first ten ids were found absent: not asked again within the negative TTL...
    clock.now += 30
    await asyncio.gather(*(cache.check_missing(k, 0) for k in flood[:10]))
    assert len(queries) == 20
    # ...and a real key is still found, once the cap allows.
    key, _ = store.create(["app"])
    assert isinstance(await cache.check_missing(key, 0), Principal)


async def test_a_requester_that_goes_away_does_not_cancel_the_others_lookup(
    store: KeyStore,
) -> None:
    cache = KeyCache(store, KeyHasher(PEPPER), refresh_s=3600)
    cache.load()
    key, _ = store.create(["app"])
    first = asyncio.ensure_future(cache.check_missing(key, time.time()))
    second = asyncio.ensure_future(cache.check_missing(key, time.time()))
    await asyncio.sleep(0)  # both waiting on the one lookup
    first.cancel()  # the first client disconnected
    assert isinstance(await second, Principal)
    assert cache.lookups == 1
