"""Job leases (one holder per scheduled job across processes); how a privacy request came.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bastion_job_leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_us", sa.BigInteger(), nullable=False),
        sa.Column("last_run_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_bastion_job_leases")),
    )
    # Requests received outside the API (letter, e-mail, phone) say how, with a note.
    with op.batch_alter_table("privacy_requests") as batch:
        batch.add_column(sa.Column("channel", sa.String(16), nullable=True))
        batch.add_column(sa.Column("note", sa.String(1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("privacy_requests") as batch:
        batch.drop_column("note")
        batch.drop_column("channel")
    op.drop_table("bastion_job_leases")
