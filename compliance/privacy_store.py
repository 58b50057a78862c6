"""What Bastion keeps about data subjects beyond the audit log: profile, flags, tombstones.

- Profile (display name, email, other attributes): rectification appends a new version,
  so the history of corrections is kept (Art. 16) until erasure removes all of it.
- Flags per subject: restriction of processing (Art. 18), CCPA do-not-sell/share, and a
  legal hold that blocks erasure (Art. 17(3)) with its reason.
- Tombstones: an erased subject leaves a keyed hash of their id and the signed receipt.

Third-party exports ask :func:`do_not_sell_subjects`; the gateway's hot path asks
:func:`restricted_subjects` (through a cache).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from compliance.privacy_schema import flags, profiles, tombstones
from compliance.records import now_us

PROFILE_FIELDS = ("display_name", "email", "attributes")


@dataclass(frozen=True, slots=True)
class SubjectFlags:
    restricted: bool = False
    restricted_reason: str | None = None
    do_not_sell: bool = False
    legal_hold: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "restricted": self.restricted,
            "restricted_reason": self.restricted_reason,
            "do_not_sell": self.do_not_sell,
            "legal_hold": self.legal_hold,
        }


def do_not_sell_subjects(engine: Engine) -> set[str]:
    """Subjects who opted out of sale/sharing (CCPA): leave them out of third-party exports."""
    with engine.connect() as connection:
        return set(connection.scalars(select(flags.c.subject_id).where(flags.c.do_not_sell)))


def restricted_subjects(engine: Engine) -> set[str]:
    """Subjects whose processing is restricted (Art. 18): their model calls are refused."""
    with engine.connect() as connection:
        return set(connection.scalars(select(flags.c.subject_id).where(flags.c.restricted)))


def subject_ref(tombstone_key: bytes, subject_id: str) -> str:
    """A keyed hash of the subject id: stable, but no use without the key."""
    return hmac.new(tombstone_key, subject_id.encode(), hashlib.sha256).hexdigest()[:32]


class PrivacyStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- profile -----------------------------------------------------------------

    def profile_history(self, subject_id: str) -> list[dict[str, Any]]:
        query = (
            select(profiles).where(profiles.c.subject_id == subject_id).order_by(profiles.c.version)
        )
        with self._engine.connect() as connection:
            return [
                {
                    "version": row.version,
                    "data": orjson.loads(row.data),
                    "changed_us": row.changed_us,
                    "changed_by": row.changed_by,
                    "note": row.note,
                }
                for row in connection.execute(query)
            ]

    def profile(self, subject_id: str) -> dict[str, Any] | None:
        history = self.profile_history(subject_id)
        return history[-1]["data"] if history else None

    def rectify(
        self, subject_id: str, changes: dict[str, Any], *, actor: str | None, note: str | None
    ) -> dict[str, Any]:
        """Append the corrected profile as a new version; the old versions stay."""
        with self._engine.begin() as connection:
            last = connection.execute(
                select(profiles.c.version, profiles.c.data)
                .where(profiles.c.subject_id == subject_id)
                .order_by(profiles.c.version.desc())
                .limit(1)
            ).first()
            current: dict[str, Any] = orjson.loads(last.data) if last is not None else {}
            merged = {**current, **changes}
            if isinstance(changes.get("attributes"), dict):
                merged["attributes"] = {**current.get("attributes", {}), **changes["attributes"]}
            version = (last.version if last is not None else 0) + 1
            connection.execute(
                profiles.insert().values(
                    subject_id=subject_id,
                    version=version,
                    data=orjson.dumps(merged, option=orjson.OPT_SORT_KEYS).decode(),
                    changed_us=now_us(),
                    changed_by=actor,
                    note=note,
                )
            )
        return {"version": version, "data": merged}

    # -- flags -------------------------------------------------------------------

    def flags(self, subject_id: str) -> SubjectFlags:
        with self._engine.connect() as connection:
            row = connection.execute(
                select(
                    flags.c.restricted,
                    flags.c.restricted_reason,
                    flags.c.do_not_sell,
                    flags.c.legal_hold,
                ).where(flags.c.subject_id == subject_id)
            ).first()
        return SubjectFlags(*row) if row is not None else SubjectFlags()

    def set_flags(self, subject_id: str, **values: Any) -> SubjectFlags:
        """Change some of ``restricted``, ``restricted_reason``, ``do_not_sell``, ``legal_hold``."""
        unknown = set(values) - set(SubjectFlags.__slots__)
        if unknown:
            raise ValueError(f"unknown flag(s) {sorted(unknown)}")
        with self._engine.begin() as connection:
            _ensure_flags_row(connection, subject_id)
            connection.execute(
                update(flags)
                .where(flags.c.subject_id == subject_id)
                .values(**values, updated_us=now_us())
            )
        return self.flags(subject_id)

    # -- erasure -----------------------------------------------------------------

    def tombstone(self, ref: str) -> dict[str, Any] | None:
        with self._engine.connect() as connection:
            row = connection.execute(
                select(tombstones.c.receipt).where(tombstones.c.subject_ref == ref)
            ).first()
        return orjson.loads(row.receipt) if row is not None else None

    def erase(self, subject_id: str, ref: str, receipt: dict[str, Any]) -> dict[str, int]:
        """Delete the subject's profile history and flags; leave the tombstone.

        On SQLite the freed pages are zeroed (``secure_delete``); the caller destroys the
        data key next, which also empties the WAL.
        """
        with self._engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA secure_delete=ON")
            versions = connection.execute(
                delete(profiles).where(profiles.c.subject_id == subject_id)
            ).rowcount
            flag_rows = connection.execute(
                delete(flags).where(flags.c.subject_id == subject_id)
            ).rowcount
            connection.execute(delete(tombstones).where(tombstones.c.subject_ref == ref))
            connection.execute(
                tombstones.insert().values(
                    subject_ref=ref,
                    erased_us=receipt["erased_us"],
                    receipt=orjson.dumps(receipt).decode(),
                )
            )
        return {"profile_versions": versions, "flag_rows": flag_rows}


def _ensure_flags_row(connection: Connection, subject_id: str) -> None:
    values = {
        "subject_id": subject_id,
        "restricted": False,
        "do_not_sell": False,
        "updated_us": now_us(),
    }
    name = connection.dialect.name
    if name == "postgresql":
        statement: Any = postgresql.insert(flags).on_conflict_do_nothing()
    elif name == "sqlite":
        statement = sqlite.insert(flags).on_conflict_do_nothing()
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported stores
        raise NotImplementedError(name)
    connection.execute(statement, values)
