"""Anomaly detection: recorded events, scored windows, trained models, flags.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

The tables are defined once, in monitors/anomaly/schema.py (the monitors package never
imports the gateway, so the definition lives there and this revision creates it).
"""

from __future__ import annotations

from alembic import op

from monitors.anomaly.schema import metadata

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
