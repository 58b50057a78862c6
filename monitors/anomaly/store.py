"""Reading and writing the anomaly tables; the model's safe serialisation.

The model is a pickle (scikit-learn's trees have no other supported format, and skops is
not a dependency), so loading one from a database an attacker could write would run
their code. Each blob therefore carries an HMAC-SHA256 under a key derived from the
master key, which the database never holds, and is unpickled only after the MAC and the
scikit-learn version both match; otherwise it is refused and the scorer retrains.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sklearn
from sqlalchemy import Engine, delete, func, insert, select

from monitors.anomaly.detector import AnomalyModel
from monitors.anomaly.features import FEATURES, ROW_FIELDS, WindowBatch
from monitors.anomaly.schema import anomalies, events, models, windows

LIBRARY = f"scikit-learn {sklearn.__version__}"


class ModelRefused(Exception):
    """A stored model whose MAC or library version does not match: not loaded."""


def insert_events(engine: Engine, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    names = [f if f != "key_id" else "key_id" for f in ROW_FIELDS]
    with engine.begin() as connection:
        connection.execute(insert(events), [dict(zip(names, row, strict=True)) for row in rows])


def read_events(engine: Engine, since_us: int, until_us: int) -> list[tuple[Any, ...]]:
    """Events that ended in ``[since_us, until_us)``, as rows of ROW_FIELDS."""
    columns = [events.c[name] for name in ROW_FIELDS]
    with engine.connect() as connection:
        result = connection.execute(
            select(*columns).where(events.c.end_us >= since_us, events.c.end_us < until_us)
        )
        return [tuple(row) for row in result]


def insert_windows(
    engine: Engine, batch: WindowBatch, score: np.ndarray | None, flagged: np.ndarray
) -> None:
    if len(batch) == 0:
        return
    values = [
        {
            "key_id": str(batch.key_id[i]),
            "start_us": int(batch.start_us[i]),
            "requests": int(batch.n[i]),
            "features": batch.X[i].astype("<f8").tobytes(),
            "score": None if score is None else float(score[i]),
            "flagged": bool(flagged[i]),
        }
        for i in range(len(batch))
    ]
    with engine.begin() as connection:
        connection.execute(insert(windows), values)


@dataclass(frozen=True, slots=True)
class TrainingSet:
    key_id: np.ndarray
    start_us: np.ndarray
    X: np.ndarray
    requests: int


def training_windows(engine: Engine, since_us: int) -> TrainingSet:
    """Unflagged windows since ``since_us`` (of the current feature set), in time order."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(windows.c.key_id, windows.c.start_us, windows.c.features, windows.c.requests)
            .where(windows.c.start_us >= since_us, windows.c.flagged.is_(False))
            .order_by(windows.c.start_us)
        ).all()
    width = len(FEATURES) * 8
    rows = [r for r in rows if len(r.features) == width]
    if not rows:
        return TrainingSet(
            np.array([], dtype=object), np.zeros(0, np.int64), np.zeros((0, len(FEATURES))), 0
        )
    X = np.frombuffer(b"".join(r.features for r in rows), dtype="<f8").reshape(len(rows), -1)
    return TrainingSet(
        np.array([r.key_id for r in rows], dtype=object),
        np.array([r.start_us for r in rows], dtype=np.int64),
        X.copy(),
        sum(r.requests for r in rows),
    )


@dataclass(frozen=True, slots=True)
class History:
    windows: int
    first_us: int | None
    last_us: int | None

    @property
    def span_s(self) -> float:
        if self.first_us is None or self.last_us is None:
            return 0.0
        return (self.last_us - self.first_us) / 1e6


def history(engine: Engine) -> History:
    with engine.connect() as connection:
        count, first, last = connection.execute(
            select(func.count(), func.min(windows.c.start_us), func.max(windows.c.start_us))
        ).one()
    return History(int(count), first, last)


def _mac(key: bytes, blob: bytes) -> str:
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def save_model(engine: Engine, model: AnomalyModel, mac_key: bytes, now_us: int) -> int:
    blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    with engine.begin() as connection:
        version = connection.execute(
            insert(models)
            .values(
                created_us=now_us,
                trained_from_us=model.trained_from_us,
                trained_to_us=model.trained_to_us,
                rows=model.rows,
                requests=model.requests,
                threshold=float(model.threshold),
                library=LIBRARY,
                mac=_mac(mac_key, blob),
                blob=blob,
            )
            .returning(models.c.version)
        ).scalar_one()
    model.version = int(version)
    return int(version)


def load_latest_model(engine: Engine, mac_key: bytes) -> AnomalyModel | None:
    """The newest model, or None; ModelRefused when its MAC or library does not match."""
    with engine.connect() as connection:
        row = connection.execute(select(models).order_by(models.c.version.desc()).limit(1)).first()
    if row is None:
        return None
    if not hmac.compare_digest(row.mac, _mac(mac_key, row.blob)):
        raise ModelRefused(f"model version {row.version}: its MAC does not match")
    if row.library != LIBRARY:
        raise ModelRefused(f"model version {row.version} was made by {row.library}")
    model: AnomalyModel = pickle.loads(row.blob)
    model.version = int(row.version)
    return model


def latest_model_info(engine: Engine) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(
                models.c.version,
                models.c.created_us,
                models.c.trained_from_us,
                models.c.trained_to_us,
                models.c.rows,
                models.c.threshold,
            )
            .order_by(models.c.version.desc())
            .limit(1)
        ).first()
    return None if row is None else dict(row._mapping)


def insert_anomalies(engine: Engine, records: list[dict[str, Any]]) -> list[int]:
    if not records:
        return []
    ids = []
    with engine.begin() as connection:
        for record in records:
            ids.append(
                connection.execute(
                    insert(anomalies).values(**record).returning(anomalies.c.id)
                ).scalar_one()
            )
    return ids


@dataclass(frozen=True, slots=True)
class AnomalyFilter:
    since_us: int | None = None
    until_us: int | None = None
    key_id: str | None = None
    model: str | None = None
    family: str | None = None


class BadCursor(ValueError):
    pass


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"a:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        if prefix != "a" or not number.isdigit():
            raise ValueError
        return int(number)
    except (ValueError, UnicodeDecodeError):
        raise BadCursor(cursor) from None


def query_anomalies(
    engine: Engine, where: AnomalyFilter, limit: int, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; ``cursor`` from the previous page continues after it."""
    query = select(anomalies).order_by(anomalies.c.id.desc()).limit(limit + 1)
    if cursor is not None:
        query = query.where(anomalies.c.id < decode_cursor(cursor))
    if where.since_us is not None:
        query = query.where(anomalies.c.time_us >= where.since_us)
    if where.until_us is not None:
        query = query.where(anomalies.c.time_us < where.until_us)
    if where.key_id is not None:
        query = query.where(anomalies.c.key_id == where.key_id)
    if where.model is not None:
        query = query.where(anomalies.c.model == where.model)
    if where.family is not None:
        query = query.where(anomalies.c.family == where.family)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(query)]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1]["id"]) if more and rows else None


def prune(engine: Engine, events_before_us: int, windows_before_us: int) -> None:
    with engine.begin() as connection:
        connection.execute(delete(events).where(events.c.end_us < events_before_us))
        connection.execute(delete(windows).where(windows.c.start_us < windows_before_us))
