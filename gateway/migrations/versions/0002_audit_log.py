"""Audit log: hash-chained entries, signed checkpoints, wrapped data keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# BIGINT does not autoincrement on SQLite: only an INTEGER PRIMARY KEY is the rowid.
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("writer_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("data_key_id", sa.String(32), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("route", sa.String(256), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_us", sa.BigInteger(), nullable=True),
        sa.Column("ttft_us", sa.BigInteger(), nullable=True),
        sa.Column("guard", sa.String(512), nullable=True),
        sa.Column("watermark", sa.String(256), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("entry_hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("writer_id", "seq", name=op.f("pk_audit_entries")),
    )
    for column in ("time_us", "request_id", "key_id", "data_key_id"):
        op.create_index(op.f(f"ix_audit_entries_{column}"), "audit_entries", [column])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("writer_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("head_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("signer", sa.String(32), nullable=False),
        sa.Column("signature", sa.LargeBinary(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )
    op.create_index(op.f("ix_audit_checkpoints_writer_id"), "audit_checkpoints", ["writer_id"])
    op.create_table(
        "audit_data_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(300), nullable=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("kek_id", sa.String(16), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("destroyed_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_data_keys")),
        sa.UniqueConstraint("owner", name=op.f("uq_audit_data_keys_owner")),
    )


def downgrade() -> None:
    op.drop_table("audit_data_keys")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_entries")
