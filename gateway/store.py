"""The SQL store shared by keys, audit and privacy: engine, schema and migrations.

SQLite by default (a file in the working directory); PostgreSQL when
``BASTION_DATABASE_URL`` points at one (``postgresql://`` uses psycopg 3). The schema
is owned by Alembic (``gateway/migrations``); :func:`migrate` brings a database to the
latest revision and is run once by ``bastion serve`` before workers start.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import JSON, DateTime, Engine, LargeBinary, MetaData, String, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import func

from compliance.private_files import create_private_file

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class ApiKeyRow(Base):
    """An API key. Only an HMAC of its secret is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    roles: Mapped[list[str]] = mapped_column(JSON)
    subject_id: Mapped[str | None] = mapped_column(String(256), index=True)
    models: Mapped[list[str] | None] = mapped_column(JSON)
    tier: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy would otherwise pick psycopg2)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.removeprefix("postgres://")
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL; None for memory and ``file:`` URI databases."""
    parsed = make_url(url)
    database = parsed.database
    if (
        not database
        or database == ":memory:"
        or parsed.query.get("uri")
        or database.startswith("file:")
    ):
        return None
    return Path(database)


SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another's lock before it reports one."""


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s})
        path = sqlite_file(url)
        if path is not None:

            @event.listens_for(engine, "do_connect")
            def _private_file(*_args: object) -> None:
                # The store holds subject ids and privacy profiles: made 0600 (in 0700
                # folders) when the first connection would create it. SQLite gives its
                # -wal and -shm files the database file's mode.
                if not path.exists():
                    create_private_file(path)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: object, _record: object) -> None:
            cursor = connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


MIGRATION_LOCK = 0x6261_7374_696F_6E  # "bastion": the advisory lock migrations hold


def migrate(engine: Engine) -> None:
    """Upgrade the database to the latest schema revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together on an empty database: one migrates, the others
            # wait for it and then find nothing to do (instead of racing on the tables).
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
