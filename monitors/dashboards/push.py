"""Send the dashboards to a running Grafana with grafana-client (Grafana's HTTP API).

What it sends, per Grafana's documented API:

* ``GET /api/folders/{uid}``; on 404 ``POST /api/folders {"uid", "title"}``, or when the
  title differs ``PUT /api/folders/{uid} {"title", "overwrite": true}``;
* per dashboard ``POST /api/dashboards/db {"dashboard", "folderUid", "overwrite": true,
  "message"}``: created when its uid is new, replaced when it exists.

Authentication is a service-account token (``Authorization: Bearer``) or a user and
password (basic); both are read from files or the environment, never from arguments,
so they stay out of shell history and process listings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException


class PushError(Exception):
    """Grafana refused or could not be reached; the message says which call and why."""


def _reason(exc: Exception) -> str:
    """Grafana's message, or the transport's (grafana-client lets connection errors of
    its HTTP library through unwrapped)."""
    return str(exc.message) if isinstance(exc, GrafanaException) else str(exc)


_FAILURES = (GrafanaException, niquests.exceptions.RequestException)


@dataclass(frozen=True)
class PushResult:
    folder_uid: str
    folder_created: bool
    dashboards: list[dict[str, Any]]
    """Grafana's answer per dashboard (uid, url, version, status)."""


def connect(url: str, credential: str | tuple[str, str], timeout_s: float = 10.0) -> GrafanaApi:
    """A client for ``url`` with a token or a (user, password) pair."""
    api: GrafanaApi = GrafanaApi.from_url(url=url, credential=credential, timeout=timeout_s)
    return api


def ensure_folder(api: GrafanaApi, uid: str, title: str) -> bool:
    """Create the folder, or give it ``title``; True when it was created."""
    try:
        existing = api.folder.get_folder(uid)  # type: ignore[no-untyped-call]
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise PushError(f"GET /api/folders/{uid}: {exc.message}") from exc
        existing = None
    except _FAILURES as exc:
        raise PushError(f"GET /api/folders/{uid}: {_reason(exc)}") from exc
    try:
        if existing is None:
            api.folder.create_folder(title, uid=uid)  # type: ignore[no-untyped-call]
            return True
        if existing.get("title") != title:
            api.folder.update_folder(uid, title=title, overwrite=True)  # type: ignore[no-untyped-call]
    except _FAILURES as exc:
        raise PushError(f"folder {uid}: {_reason(exc)}") from exc
    return False


def push(
    api: GrafanaApi,
    documents: Mapping[str, dict[str, Any]],
    folder_uid: str,
    folder_title: str,
    message: str = "bastion dashboards push",
) -> PushResult:
    """Create or update the folder, then create or replace each dashboard in it."""
    created = ensure_folder(api, folder_uid, folder_title)
    answers = []
    for uid, document in documents.items():
        # A numeric id belongs to one Grafana instance; the uid is what identifies it.
        body = {key: value for key, value in document.items() if key != "id"}
        try:
            answer = api.dashboard.update_dashboard(  # type: ignore[no-untyped-call]
                {"dashboard": body, "folderUid": folder_uid, "overwrite": True, "message": message}
            )
        except _FAILURES as exc:
            raise PushError(f"dashboard {uid}: {_reason(exc)}") from exc
        answers.append(dict(answer))
    return PushResult(folder_uid, created, answers)
