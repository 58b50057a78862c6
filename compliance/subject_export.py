"""A subject's audit entries for their access export (GDPR Art. 15, 20), page by page.

The export has no cap: entries are read a page at a time (keyset paging, as
``GET /compliance/audit``), decrypted and written out as JSON before the next page is
read, so memory stays bounded by the page whatever the subject's history.
:func:`json_document` writes one JSON object whose one array arrives in pieces; the
gateway streams those pieces as the answer's body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
from sqlalchemy import Engine

from compliance.audit_query import AuditFilter, query_page
from compliance.keyring import KeyRing
from compliance.reader import AuditEntry, AuditReader, PayloadUnavailable

PAGE_SIZE = 500


def entry_json(reader: AuditReader, entry: AuditEntry) -> dict[str, Any]:
    """The entry's metadata and its payload decrypted (or why it cannot be)."""
    item = entry.as_json()
    if entry.payload is not None:
        try:
            item["payload"] = reader.payload(entry)
        except PayloadUnavailable as exc:
            item["payload_unavailable"] = exc.reason
    return item


def subject_entries(
    engine: Engine, keyring: KeyRing, subject_id: str, *, page_size: int = PAGE_SIZE
) -> Iterator[list[dict[str, Any]]]:
    """Every entry of the subject, oldest first, a page of ready JSON values at a time."""
    reader = AuditReader(engine, keyring)
    where = AuditFilter(subject_id=subject_id)
    cursor: str | None = None
    while True:
        page = query_page(engine, keyring, where, limit=page_size, cursor=cursor)
        yield [entry_json(reader, entry) for entry in page.entries]
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def json_document(
    head: dict[str, Any],
    name: str,
    pages: Iterable[list[dict[str, Any]]],
    tail: Callable[[], dict[str, Any]],
) -> Iterator[bytes]:
    """``{**head, name: [every item of every page], **tail()}`` as UTF-8 JSON, in pieces.

    ``tail`` is called once the last page is written (the export closes its ledger
    request there, so the list of requests it adds shows it completed). An error part
    way leaves the JSON unfinished, so a reader can never take a cut export for whole.
    """
    if not head:
        raise ValueError("the head must hold at least one field")
    yield orjson.dumps(head)[:-1] + b"," + orjson.dumps(name) + b":["
    first = True
    for page in pages:
        if not page:
            continue
        body = b",".join(orjson.dumps(item) for item in page)
        yield body if first else b"," + body
        first = False
    rest = tail()
    yield b"]" + (b"," + orjson.dumps(rest)[1:] if rest else b"}")
