"""Data keys in the database: created on first use, cached, destroyed, re-wrapped.

One data key per owner: ``subject:<id>`` for a data subject, ``key:<id>`` for an API key
acting for no subject, ``anonymous`` for the rest (see :func:`compliance.records.data_key_owner`).
Destroying a subject's key is crypto-shredding: the row keeps its id (the pseudonym in
the entries) but loses the wrapped key and the link to the subject, so every payload it
sealed is unreadable while the entries, and so the chain, stay as they were.

Rotation of the master key re-wraps every data key under the new KEK and touches no entry.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, Engine, Insert, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from compliance.audit_schema import data_keys
from compliance.envelope import EnvelopeError, KeyEncryptionKey, new_data_key
from compliance.records import now_us

log = logging.getLogger("bastion.audit.keys")


class DataKeyUnavailable(Exception):
    """The data key was destroyed (crypto-shredded), or never existed."""


@dataclass(frozen=True, slots=True)
class DataKey:
    id: str
    aead: AESGCM


@dataclass(frozen=True, slots=True)
class ShredResult:
    keys: int
    """Data keys destroyed."""
    storage_scrubbed: bool | None
    """SQLite: old page images overwritten and the WAL emptied (False if a reader held
    it open; True once done). None on PostgreSQL, whose dead tuples and WAL keep the
    old wrapped key until vacuumed and recycled: rotate the master key to retire them."""


def subject_owner(subject_id: str) -> str:
    return f"subject:{subject_id}"


def _insert_if_absent(connection: Connection, values: dict[str, object]) -> None:
    statement: Insert
    name = connection.dialect.name
    if name == "postgresql":
        statement = postgresql.insert(data_keys).on_conflict_do_nothing(index_elements=["owner"])
    elif name == "sqlite":
        statement = sqlite.insert(data_keys).on_conflict_do_nothing(index_elements=["owner"])
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported stores
        raise NotImplementedError(name)
    connection.execute(statement, values)


class KeyRing:
    """The audit log's data keys, for one process.

    ``master_key`` wraps new keys; ``previous_master_keys`` still unwrap (for a rolling
    rotation). The writer side caches a data key per owner for ``cache_ttl_s`` so that a
    destruction made by another process is seen within that time; reads (decryption)
    always look the key up.
    """

    def __init__(
        self,
        engine: Engine,
        master_key: bytes,
        *,
        previous_master_keys: Sequence[bytes] = (),
        cache_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._kek = KeyEncryptionKey(master_key)
        self._keks = {k.id: k for k in map(KeyEncryptionKey, previous_master_keys)}
        self._keks[self._kek.id] = self._kek
        self._ttl = cache_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, DataKey]] = {}

    def for_owner(self, owner: str) -> DataKey:
        """The owner's data key, created (and committed) if it has none."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(owner)
        if hit is not None and hit[0] > now:
            return hit[1]
        key = self._lookup(owner)
        if key is None:
            key_id = secrets.token_hex(16)
            with self._engine.begin() as connection:
                _insert_if_absent(
                    connection,
                    {
                        "id": key_id,
                        "owner": owner,
                        "wrapped": self._kek.wrap(key_id, new_data_key()),
                        "kek_id": self._kek.id,
                        "created_us": now_us(),
                        "destroyed_us": None,
                    },
                )
            key = self._lookup(owner)  # ours, or the one another process created first
            assert key is not None
        with self._lock:
            self._cache[owner] = (now + self._ttl, key)
        return key

    def for_owners(self, owners: Iterable[str]) -> dict[str, DataKey]:
        """:meth:`for_owner` for each of ``owners`` (a batch's), with one clock reading."""
        now = self._clock()
        cache = self._cache
        keys: dict[str, DataKey] = {}
        for owner in owners:
            hit = cache.get(owner)  # one dict read is atomic: no lock to read the cache
            keys[owner] = hit[1] if hit is not None and hit[0] > now else self.for_owner(owner)
        return keys

    def _lookup(self, owner: str) -> DataKey | None:
        with self._engine.connect() as connection:
            row = connection.execute(
                select(data_keys.c.id, data_keys.c.wrapped, data_keys.c.kek_id).where(
                    data_keys.c.owner == owner
                )
            ).first()
        return None if row is None else self._unwrap(row.id, row.wrapped, row.kek_id)

    def _unwrap(self, key_id: str, wrapped: bytes | None, kek_id: str | None) -> DataKey:
        if wrapped is None:
            raise DataKeyUnavailable(f"data key {key_id} was destroyed")
        kek = self._keks.get(kek_id or "")
        if kek is None:
            raise EnvelopeError(f"data key {key_id} is wrapped under an unknown master key")
        return DataKey(key_id, AESGCM(kek.unwrap(key_id, wrapped)))

    def get(self, data_key_id: str) -> DataKey:
        """The data key with this id, for decryption; DataKeyUnavailable if shredded."""
        with self._engine.connect() as connection:
            row = connection.execute(
                select(data_keys.c.wrapped, data_keys.c.kek_id).where(data_keys.c.id == data_key_id)
            ).first()
        if row is None:
            raise DataKeyUnavailable(f"there is no data key {data_key_id}")
        return self._unwrap(data_key_id, row.wrapped, row.kek_id)

    def ids_for(self, owner: str) -> list[str]:
        """Ids of the owner's live data keys (its pseudonyms in the entries)."""
        with self._engine.connect() as connection:
            return list(
                connection.scalars(select(data_keys.c.id).where(data_keys.c.owner == owner))
            )

    def destroy(self, owner: str) -> ShredResult:
        """Crypto-shred: forget the owner's data keys and the link to the owner."""
        with self._lock:
            self._cache.pop(owner, None)
        sqlite_db = self._engine.dialect.name == "sqlite"
        with self._engine.begin() as connection:
            if sqlite_db:
                # Zero what the UPDATE frees instead of leaving the old key in the page.
                connection.exec_driver_sql("PRAGMA secure_delete=ON")
            result = connection.execute(
                update(data_keys)
                .where(data_keys.c.owner == owner)
                .values(owner=None, wrapped=None, kek_id=None, destroyed_us=now_us())
            )
        scrubbed = None
        if sqlite_db:
            with self._engine.connect() as connection:
                busy = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").scalar()
            scrubbed = busy == 0
        log.info("destroyed %d data key(s) of %s", result.rowcount, owner.split(":")[0])
        return ShredResult(result.rowcount, scrubbed)

    def destroy_subject(self, subject_id: str) -> ShredResult:
        return self.destroy(subject_owner(subject_id))


@dataclass(frozen=True, slots=True)
class RotationResult:
    rewrapped: int
    """Data keys moved from the old KEK to the new one by this run."""
    foreign: int
    """Live data keys wrapped under neither key (left alone: a third master key exists)."""


def rotate_master_key(
    engine: Engine, old_master_key: bytes, new_master_key: bytes, *, batch: int = 500
) -> RotationResult:
    """Re-wrap every data key wrapped under the old master key with the new one.

    Entries are not read or written. Idempotent, and safe to resume: each batch commits
    on its own and only rows still under the old key are updated.
    """
    old, new = KeyEncryptionKey(old_master_key), KeyEncryptionKey(new_master_key)
    rewrapped = 0
    change = (
        update(data_keys)
        .where(data_keys.c.id == bindparam("key_id"), data_keys.c.kek_id == old.id)
        .values(wrapped=bindparam("new_wrapped"), kek_id=new.id)
    )
    while old.id != new.id:
        with engine.connect() as connection:
            rows = connection.execute(
                select(data_keys.c.id, data_keys.c.wrapped)
                .where(data_keys.c.kek_id == old.id, data_keys.c.wrapped.is_not(None))
                .order_by(data_keys.c.id)
                .limit(batch)
            ).all()
        if not rows:
            break
        params = [
            {"key_id": r.id, "new_wrapped": new.wrap(r.id, old.unwrap(r.id, r.wrapped))}
            for r in rows
        ]
        with engine.begin() as connection:
            changed = connection.execute(change, params).rowcount
        if changed <= 0:  # another rotation moved them first
            break
        rewrapped += changed
    with engine.connect() as connection:
        foreign = connection.execute(
            select(func.count())
            .select_from(data_keys)
            .where(
                data_keys.c.wrapped.is_not(None),
                data_keys.c.kek_id.not_in([old.id, new.id]),
            )
        ).scalar_one()
    return RotationResult(rewrapped, foreign)
