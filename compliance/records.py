"""What the gateway hands to the audit log (:class:`AuditRecord`) and gets back (:class:`EntryRef`).

A record is checked and serialised by :func:`prepare` on the caller's thread, so a bad
record fails its own ``append`` and never the batch it would have shared with others.
These run once per proxied request on the event loop, hence plain slotted classes and
tuples rather than frozen dataclasses (whose ``__init__`` costs a call per field).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

REQUEST = "request"
"""Kind of the entry for one proxied request; other kinds name an action."""
KEY_CREATED = "key.created"
KEY_REVOKED = "key.revoked"
EXPORT_MADE = "export.made"
SUBJECT_ERASED = "subject.erased"
CONTENT_VIEWED = "audit.content_viewed"

ANONYMOUS_OWNER = "anonymous"

# Lengths of the text columns (audit_schema); longer values are refused up front.
_TEXT_LIMITS = {
    "kind": 64,
    "request_id": 128,
    "key_id": 64,
    "subject_id": 256,
    "model": 256,
    "route": 256,
    "guard": 512,
    "watermark": 256,
}
_TEXT_MAXIMA = tuple(_TEXT_LIMITS.values())
_INT_FIELDS = ("time_us", "status", "prompt_tokens", "completion_tokens", "latency_us", "ttft_us")
# Canonical JSON (RFC 8785) writes integers exactly only up to 2**53.
_INT_LIMIT = 2**53


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    """One audited request or action, as the gateway knows it.

    ``append`` takes what it needs from the record before it returns control (see
    :func:`prepare`): changing a record afterwards changes no entry.

    Everything but ``payload`` is stored in clear. ``payload`` (a JSON object: by
    convention ``request``, ``response`` and, for a cut stream, ``delivered`` and
    ``cut``) is sealed with the data key of ``subject_id``, or of ``key_id`` when there
    is no subject, or the shared anonymous key. ``subject_id`` itself is never stored
    in the entry: the entry carries the subject's data-key id as a pseudonym.
    """

    kind: str = REQUEST
    time_us: int = field(default_factory=now_us)
    request_id: str | None = None
    key_id: str | None = None
    subject_id: str | None = None
    model: str | None = None
    route: str | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_us: int | None = None
    ttft_us: int | None = None
    guard: str | None = None
    watermark: str | None = None
    detail: Mapping[str, Any] | None = None
    payload: Mapping[str, Any] | None = None


class EntryRef(NamedTuple):
    """Where a durable entry sits: its chain, its place in it, and its hash."""

    writer_id: str
    seq: int
    entry_hash: bytes

    @property
    def id(self) -> str:
        return f"{self.writer_id}:{self.seq}"

    def __str__(self) -> str:
        return self.id


class PreparedRecord(NamedTuple):
    """A checked record: the clear columns in canonical order, and what to seal."""

    columns: tuple[Any, ...]
    """time_us, kind, request_id, key_id, model, route, status, prompt_tokens,
    completion_tokens, latency_us, ttft_us, guard, watermark, detail (JSON text)."""
    owner: str | None
    """Whose data key seals the payload / names the subject; None: no data key."""
    plaintext: bytes | None


def data_key_owner(record: AuditRecord) -> str | None:
    """``subject:<id>``, else ``key:<id>`` when there is a payload, else ``anonymous``."""
    if record.subject_id is not None:
        return f"subject:{record.subject_id}"
    if record.payload is None:
        return None
    if record.key_id is not None:
        return f"key:{record.key_id}"
    return ANONYMOUS_OWNER


def _text_problem(name: str, value: object) -> Exception:
    limit = _TEXT_LIMITS[name]
    if not isinstance(value, str):
        return TypeError(f"audit record: {name} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        return ValueError(f"audit record: {name} is longer than {limit} characters")
    if "\x00" in value:
        return ValueError(f"audit record: {name} contains a NUL character")
    return ValueError(f"audit record: {name} is not valid Unicode")


def _int_problem(name: str, value: object) -> Exception:
    if not isinstance(value, int) or isinstance(value, bool):
        return TypeError(f"audit record: {name} must be an integer, not {type(value).__name__}")
    return ValueError(f"audit record: {name} is out of range")


def _json(name: str, value: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise ValueError(f"audit record: {name} is not JSON-serialisable ({exc})") from exc


def _check_texts(texts: tuple[Any, ...]) -> None:
    """Raise for the first bad text field (the slow, exact check behind prepare's)."""
    for name, value in zip(_TEXT_LIMITS, texts, strict=True):
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > _TEXT_LIMITS[name] or "\x00" in value:
            raise _text_problem(name, value)
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                raise _text_problem(name, value) from exc


def _check_numbers(numbers: tuple[Any, ...]) -> None:
    for name, number in zip(_INT_FIELDS, numbers, strict=True):
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int):
            raise _int_problem(name, number)
        if not -_INT_LIMIT < number < _INT_LIMIT:
            raise _int_problem(name, number)


def prepare(record: AuditRecord) -> PreparedRecord:
    """Check ``record`` and serialise its JSON parts; ValueError/TypeError if it is bad.

    Runs on the caller's thread (the event loop) for every request: a quick test that
    passes every good record, and the exact checks only when it does not.
    """
    r = record
    texts = (r.kind, r.request_id, r.key_id, r.subject_id, r.model, r.route, r.guard, r.watermark)
    for value, limit in zip(texts, _TEXT_MAXIMA, strict=True):
        if value is not None and (type(value) is not str or len(value) > limit):
            _check_texts(texts)
            break
    try:
        # One C call finds any lone surrogate (which no database would store), and
        # writes a NUL as \u0000 (a text with a literal "\u0000" takes the slow check).
        if b"\\u0000" in orjson.dumps(texts):
            _check_texts(texts)
    except TypeError:
        _check_texts(texts)
        raise
    if not r.kind:
        raise ValueError("audit record: kind is empty")
    numbers = (r.time_us, r.status, r.prompt_tokens, r.completion_tokens, r.latency_us, r.ttft_us)
    for number in numbers:
        if number is not None and (
            type(number) is not int or not -_INT_LIMIT < number < _INT_LIMIT
        ):
            _check_numbers(numbers)
            break
    detail = None if r.detail is None else _json("detail", r.detail).decode()
    plaintext = None if r.payload is None else _json("payload", r.payload)
    columns = (
        r.time_us,
        r.kind,
        r.request_id,
        r.key_id,
        r.model,
        r.route,
        r.status,
        r.prompt_tokens,
        r.completion_tokens,
        r.latency_us,
        r.ttft_us,
        r.guard,
        r.watermark,
        detail,
    )
    return PreparedRecord(columns, data_key_owner(r), plaintext)
