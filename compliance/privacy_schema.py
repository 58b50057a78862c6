"""The privacy tables: profiles (append-only), per-subject flags, tombstones, the ledger.

The schema is owned by Alembic (``gateway/migrations/versions/0003_privacy.py``); these
tables describe it for queries. Times are integer microseconds since the Unix epoch (UTC),
as in the audit log.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Integer, MetaData, String, Table, Text

metadata = MetaData()

profiles = Table(
    "privacy_profiles",
    metadata,
    Column("subject_id", String(256), primary_key=True),
    Column("version", Integer, primary_key=True),
    # The whole profile after this change (JSON): display_name, email, attributes.
    Column("data", Text, nullable=False),
    Column("changed_us", BigInteger, nullable=False),
    Column("changed_by", String(64), nullable=True),
    Column("note", String(512), nullable=True),
)
"""Rectification appends a version; nothing is updated in place (Art. 16, history kept)."""

flags = Table(
    "privacy_subject_flags",
    metadata,
    Column("subject_id", String(256), primary_key=True),
    Column("restricted", Boolean, nullable=False, default=False),
    Column("restricted_reason", String(512), nullable=True),
    Column("do_not_sell", Boolean, nullable=False, default=False),
    # The reason erasure is blocked (Art. 17(3)); None: no hold.
    Column("legal_hold", String(512), nullable=True),
    Column("updated_us", BigInteger, nullable=False, index=True),
)

tombstones = Table(
    "privacy_tombstones",
    metadata,
    # HMAC of the subject id: "was X erased?" can be answered without keeping X.
    Column("subject_ref", String(64), primary_key=True),
    Column("erased_us", BigInteger, nullable=False),
    Column("receipt", Text, nullable=False),
)

requests = Table(
    "privacy_requests",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("type", String(32), nullable=False),
    # The subject id; after erasure ``erased:<subject_ref>``.
    Column("subject", String(300), nullable=False, index=True),
    Column("received_us", BigInteger, nullable=False, index=True),
    Column("due_us", BigInteger, nullable=False),
    Column("extended_due_us", BigInteger, nullable=True),
    Column("extension_reason", String(1024), nullable=True),
    Column("status", String(16), nullable=False),
    Column("status_reason", String(1024), nullable=True),
    Column("completed_us", BigInteger, nullable=True),
    # How it came: None through the API; "letter", "email", "phone"... (migration 0004).
    Column("channel", String(16), nullable=True),
    # The officer's note on a request logged by hand; cleared by the subject's erasure.
    Column("note", String(1024), nullable=True),
)
