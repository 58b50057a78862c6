"""The anomaly tables (owned by Alembic: gateway/migrations/versions/0005_anomalies.py).

- ``anomaly_events``: each scored request's numbers (no payload, subject or address),
  kept ``event_retention_s`` so a scorer in another process can read them;
- ``anomaly_windows``: every scored key window's features (the training set);
- ``anomaly_models``: trained detectors, versioned, with an HMAC over the blob;
- ``anomalies``: the flags, with their explanation and the request ids of their window.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)

# BIGINT does not autoincrement on SQLite: only an INTEGER PRIMARY KEY is the rowid.
AUTO_ID = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(naming_convention={"ix": "ix_%(column_0_label)s", "pk": "pk_%(table_name)s"})

events = Table(
    "anomaly_events",
    metadata,
    Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    Column("end_us", BigInteger, nullable=False, index=True),
    Column("arrival_us", BigInteger, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("model", String(256), nullable=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("duration_s", Float, nullable=False),
    Column("ttft_s", Float, nullable=True),
    Column("guard_blocks", Integer, nullable=False),
    Column("guard_flags", Integer, nullable=False),
    Column("guard_score", Float, nullable=False),
    Column("watermark_absent", Float, nullable=True),
    Column("repetition_rate", Float, nullable=True),
)

windows = Table(
    "anomaly_windows",
    metadata,
    Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    Column("key_id", String(64), nullable=False),
    Column("start_us", BigInteger, nullable=False, index=True),
    Column("requests", Integer, nullable=False),
    Column("features", LargeBinary, nullable=False),
    Column("score", Float, nullable=True),
    Column("flagged", Boolean, nullable=False),
)

models = Table(
    "anomaly_models",
    metadata,
    Column("version", AUTO_ID, primary_key=True, autoincrement=True),
    Column("created_us", BigInteger, nullable=False),
    Column("trained_from_us", BigInteger, nullable=False),
    Column("trained_to_us", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("library", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
    Column("blob", LargeBinary, nullable=False),
)

anomalies = Table(
    "anomalies",
    metadata,
    Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    Column("time_us", BigInteger, nullable=False, index=True),
    Column("window_start_us", BigInteger, nullable=False),
    Column("key_id", String(64), nullable=False, index=True),
    Column("model", String(256), nullable=True),
    Column("family", String(16), nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("model_version", Integer, nullable=True),
    Column("requests", Integer, nullable=False),
    Column("request_ids", JSON, nullable=False),
    Column("explanation", JSON, nullable=False),
)
