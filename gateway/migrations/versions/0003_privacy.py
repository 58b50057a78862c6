"""Privacy: profiles (append-only), subject flags, erasure tombstones, request ledger.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_profiles",
        sa.Column("subject_id", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("changed_us", sa.BigInteger(), nullable=False),
        sa.Column("changed_by", sa.String(64), nullable=True),
        sa.Column("note", sa.String(512), nullable=True),
        sa.PrimaryKeyConstraint("subject_id", "version", name=op.f("pk_privacy_profiles")),
    )
    op.create_table(
        "privacy_subject_flags",
        sa.Column("subject_id", sa.String(256), nullable=False),
        sa.Column("restricted", sa.Boolean(), nullable=False),
        sa.Column("restricted_reason", sa.String(512), nullable=True),
        sa.Column("do_not_sell", sa.Boolean(), nullable=False),
        sa.Column("legal_hold", sa.String(512), nullable=True),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subject_id", name=op.f("pk_privacy_subject_flags")),
    )
    op.create_index(
        op.f("ix_privacy_subject_flags_updated_us"), "privacy_subject_flags", ["updated_us"]
    )
    op.create_table(
        "privacy_tombstones",
        sa.Column("subject_ref", sa.String(64), nullable=False),
        sa.Column("erased_us", sa.BigInteger(), nullable=False),
        sa.Column("receipt", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("subject_ref", name=op.f("pk_privacy_tombstones")),
    )
    op.create_table(
        "privacy_requests",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("received_us", sa.BigInteger(), nullable=False),
        sa.Column("due_us", sa.BigInteger(), nullable=False),
        sa.Column("extended_due_us", sa.BigInteger(), nullable=True),
        sa.Column("extension_reason", sa.String(1024), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.String(1024), nullable=True),
        sa.Column("completed_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_requests")),
    )
    op.create_index(op.f("ix_privacy_requests_subject"), "privacy_requests", ["subject"])
    op.create_index(op.f("ix_privacy_requests_received_us"), "privacy_requests", ["received_us"])


def downgrade() -> None:
    op.drop_table("privacy_requests")
    op.drop_table("privacy_tombstones")
    op.drop_table("privacy_subject_flags")
    op.drop_table("privacy_profiles")
