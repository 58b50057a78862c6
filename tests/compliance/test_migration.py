"""The Alembic migration creates exactly the tables compliance/audit_schema.py describes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from compliance.audit_schema import AuditBase


def test_the_migration_matches_the_schema(engine: Engine) -> None:
    audit_tables = set(AuditBase.metadata.tables)
    assert audit_tables <= set(inspect(engine).get_table_names())

    def ours(name: str | None, kind: str, parent: object) -> bool:
        return kind != "table" or name in audit_tables

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_name": ours, "compare_type": True}
        )
        assert compare_metadata(context, AuditBase.metadata) == []
