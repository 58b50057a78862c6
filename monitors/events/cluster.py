"""Elasticsearch 8/9 and OpenSearch 2/3 over plain HTTP: ``_bulk``, setup, delete-by-query.

Why httpx and not a vendor client: elasticsearch-py 9 sends
``Content-Type``/``Accept: application/vnd.elasticsearch+json; compatible-with=9``, which
OpenSearch (and osmem-server, our test server) refuses with 406; opensearch-py in turn is
not supported against Elasticsearch 8/9. The few APIs we need (``GET /``, ``_bulk``,
``_index_template``, ``_ilm``/``_plugins/_ism``, ``_data_stream``, ``_delete_by_query``)
take plain ``application/json`` and ``application/x-ndjson`` on both, and httpx is
already the gateway's dependency. The flavour comes from ``GET /``:
``version.distribution == "opensearch"`` (Elasticsearch has no such field).

Error contract: :class:`ClusterUnavailable` for anything worth retrying later (connection
errors, timeouts, 429, 5xx, 401/403 which an operator can fix); :class:`ClusterRejected`
for a request the cluster will never accept as sent (other 4xx).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from monitors.events.settings import ClusterAuth, EventSettings
from monitors.events.templates import (
    MAPPINGS,
    TEMPLATE_VERSION,
    Flavour,
    ilm_policy,
    index_template,
    ism_policy,
)

log = logging.getLogger("bastion.events")

_JSON = {"content-type": "application/json", "accept": "application/json"}
_NDJSON = {"content-type": "application/x-ndjson", "accept": "application/json"}


class ClusterUnavailable(Exception):
    """The cluster could not take the request now; try again later."""


class ClusterForbidden(ClusterUnavailable):
    """401/403: the credentials lack a privilege (retry once an operator fixed them)."""


class ClusterRejected(Exception):
    """The cluster refused the request itself (not one document): do not resend it."""


@dataclass(slots=True)
class BulkOutcome:
    """Per-item results of one ``_bulk`` request, by position in the request."""

    indexed: int = 0
    duplicates: int = 0
    """``create`` refused with 409: the ``_id`` is already there (a replay)."""
    retry: list[int] = field(default_factory=list)
    """Positions refused with 429: send again later."""
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    """(position, error type, reason) of items refused for good."""


@dataclass(slots=True)
class SetupReport:
    """What ``ensure_setup`` found and did, for ``bastion events setup`` and the logs."""

    flavour: Flavour
    version: str
    template: str = "present"
    """present | installed | updated"""
    lifecycle: str = "present"
    """present | installed | updated | unavailable (the cluster has no ILM/ISM API)"""
    data_stream: bool = True
    target: str = ""
    """Where documents go: the data stream, or the daily index prefix."""
    notes: list[str] = field(default_factory=list)
    template_name: str = ""
    pattern: str = ""
    policy_name: str = ""
    retention_days: int = 0

    def lines(self) -> list[str]:
        kind = "ILM" if self.flavour == "elasticsearch" else "ISM"
        lines = [
            f"cluster: {self.flavour} {self.version}",
            f"index template: {self.template} ({self.template_name} for {self.pattern}, "
            f"version {TEMPLATE_VERSION})",
            f"lifecycle policy: {self.lifecycle} ({kind} {self.policy_name}: "
            + (
                f"no {kind} API, nothing is deleted)"
                if self.lifecycle == "unavailable"
                else f"delete after {self.retention_days} days)"
            ),
            f"writes to: {self.target} ({'data stream' if self.data_stream else 'daily indices'})",
        ]
        return lines + [f"note: {note}" for note in self.notes]


def _error_type(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("type", "unknown"))
    return "unknown"


def _ism_retention(data: dict[str, Any]) -> str | None:
    """The ``min_index_age`` of the transition into the delete state of an ISM policy."""
    for state in data.get("policy", {}).get("states", []):
        for transition in state.get("transitions", []):
            if transition.get("state_name") == "delete":
                age = transition.get("conditions", {}).get("min_index_age")
                return str(age) if age is not None else None
    return None


class Cluster:
    """A connection to one cluster; ``async with`` or :meth:`aclose` when done."""

    def __init__(
        self,
        settings: EventSettings,
        auth: ClusterAuth,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if settings.url is None:
            raise ValueError("events.url is not set")
        self.settings = settings
        headers = {"user-agent": "bastion-events"}
        if auth.header:
            headers["authorization"] = auth.header
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self._client = httpx.AsyncClient(
            base_url=settings.url,
            headers=headers,
            timeout=settings.timeout_s,
            verify=verify,
            transport=transport,
        )
        self.flavour: Flavour | None = None
        self.data_stream = True

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        ok: tuple[int, ...] = (200, 201),
        params: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send; return (status, JSON body) for ``ok`` statuses and 404/400 the caller may
        inspect; raise ClusterUnavailable/ClusterRejected for the rest."""
        if body is not None:
            content, headers = orjson.dumps(body), _JSON
        else:
            headers = _NDJSON if content is not None else _JSON
        try:
            response = await self._client.request(
                method, path, content=content, headers=headers, params=params
            )
        except httpx.TransportError as exc:  # connect, read, write, pool, timeouts
            raise ClusterUnavailable(f"{method} {path}: {type(exc).__name__}") from exc
        try:
            data = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        status = response.status_code
        if status in ok or status in (400, 404):
            return status, data
        if status in (401, 403):
            raise ClusterForbidden(f"{method} {path}: {status} {_error_type(data)}")
        if status in (408, 429) or status >= 500:
            raise ClusterUnavailable(f"{method} {path}: {status} {_error_type(data)}")
        raise ClusterRejected(f"{method} {path}: {status} {_error_type(data)}")

    # discovery and setup -------------------------------------------------------------

    async def info(self) -> tuple[Flavour, str]:
        status, data = await self._request("GET", "/")
        if status != 200:
            raise ClusterRejected(f"GET /: {status}")
        version = data.get("version", {})
        flavour: Flavour = (
            "opensearch" if version.get("distribution") == "opensearch" else "elasticsearch"
        )
        self.flavour = flavour
        return flavour, str(version.get("number", "?"))

    async def ensure_setup(self, *, force: bool = False) -> SetupReport:
        """Install the lifecycle policy and the index template when missing or older than
        ours (always with ``force``); learn whether writes go to a data stream."""
        flavour, version = await self.info()
        s = self.settings
        report = SetupReport(
            flavour=flavour,
            version=version,
            template_name=s.template_name,
            pattern=s.index_pattern,
            policy_name=s.policy_name,
            retention_days=s.retention_days,
        )
        # Elasticsearch: the policy before the template that names it. OpenSearch: the
        # template first, as whether data streams are offered decides the ISM policy.
        if flavour == "elasticsearch":
            report.lifecycle = await self._ensure_ilm(force)
        await self._ensure_template(flavour, force, report)
        if flavour == "opensearch":
            report.lifecycle = await self._ensure_ism(force)
        if report.lifecycle == "unavailable":
            report.notes.append(
                "the cluster has no lifecycle API: documents are NOT deleted after "
                f"{s.retention_days} days; delete old indices yourself"
            )
        report.data_stream = self.data_stream
        report.target = s.data_stream if self.data_stream else f"{s.data_stream}-YYYY.MM.DD"
        return report

    async def _ensure_template(self, flavour: Flavour, force: bool, report: SetupReport) -> None:
        status, data = await self._request("GET", f"/_index_template/{self.settings.template_name}")
        existing = None
        if status == 200 and data.get("index_templates"):
            existing = data["index_templates"][0]["index_template"]
        current = existing is not None and (existing.get("version") or 0) >= TEMPLATE_VERSION
        if existing is not None and current and not force:
            self.data_stream = "data_stream" in existing
            return
        report.template = "installed" if existing is None else "updated"
        await self._put_template(flavour, data_stream=True)
        self.data_stream = True
        if flavour == "opensearch":
            self.data_stream = await self._data_stream_offered()
            if not self.data_stream:
                await self._put_template(flavour, data_stream=False)
                report.notes.append("no data streams here: one index per day instead")
        if existing is not None:
            await self._update_mappings(report)

    async def _put_template(self, flavour: Flavour, *, data_stream: bool) -> None:
        body = index_template(self.settings, flavour, data_stream=data_stream)
        status, data = await self._request(
            "PUT", f"/_index_template/{self.settings.template_name}", body=body
        )
        if status != 200:
            raise ClusterRejected(f"index template refused: {status} {_error_type(data)}")

    async def _data_stream_offered(self) -> bool:
        name = self.settings.data_stream
        status, data = await self._request("PUT", f"/_data_stream/{name}")
        return status == 200 or _error_type(data) == "resource_already_exists_exception"

    async def _update_mappings(self, report: SetupReport) -> None:
        """Existing indices keep their mapping until rollover: add our new fields now."""
        status, data = await self._request(
            "PUT",
            f"/{self.settings.index_pattern}/_mapping",
            body={"properties": MAPPINGS["properties"]},
            params={"allow_no_indices": "true", "expand_wildcards": "open"},
        )
        if status != 200:
            report.notes.append(f"mapping of existing indices not updated: {_error_type(data)}")

    async def _ensure_ilm(self, force: bool) -> str:
        path = f"/_ilm/policy/{self.settings.policy_name}"
        status, data = await self._request("GET", path)
        installed = data.get(self.settings.policy_name, {}).get("policy", {})
        min_age = installed.get("phases", {}).get("delete", {}).get("min_age")
        # A changed retention_days is a compliance setting: apply it, not only on --force.
        if status == 200 and not force and min_age == f"{self.settings.retention_days}d":
            return "present"
        put, data = await self._request("PUT", path, body=ilm_policy(self.settings))
        if put != 200:
            return "unavailable" if put == 400 else f"refused ({_error_type(data)})"
        return "installed" if status == 404 else "updated"

    async def _ensure_ism(self, force: bool) -> str:
        path = f"/_plugins/_ism/policies/{self.settings.policy_name}"
        status, data = await self._request("GET", path)
        if status == 400:  # "no handler found": no ISM plugin
            return "unavailable"
        current = _ism_retention(data) == f"{self.settings.retention_days}d"
        if status == 200 and not force and current:
            return "present"
        params = None
        if status == 200:  # ISM updates need the current sequence number
            params = {
                "if_seq_no": str(data.get("_seq_no", 0)),
                "if_primary_term": str(data.get("_primary_term", 1)),
            }
        body = ism_policy(self.settings, data_stream=self.data_stream)
        put, data = await self._request("PUT", path, body=body, params=params)
        if put not in (200, 201):
            return f"refused ({_error_type(data)})"
        return "installed" if status == 404 else "updated"

    async def template_present(self) -> bool:
        status, _ = await self._request("GET", f"/_index_template/{self.settings.template_name}")
        return status == 200

    # writing and erasing -------------------------------------------------------------

    async def bulk(self, items: list[tuple[str, str, bytes]]) -> BulkOutcome:
        """``create`` each (index, _id, JSON source) in one ``_bulk`` request."""
        lines: list[bytes] = []
        for index, doc_id, source in items:
            lines.append(orjson.dumps({"create": {"_index": index, "_id": doc_id}}))
            lines.append(source)
        lines.append(b"")
        status, data = await self._request("POST", "/_bulk", content=b"\n".join(lines))
        if status != 200:
            raise ClusterRejected(f"_bulk: {status} {_error_type(data)}")
        outcome = BulkOutcome()
        results = data.get("items", [])
        if len(results) != len(items):
            raise ClusterUnavailable(f"_bulk answered {len(results)} items for {len(items)}")
        for position, result in enumerate(results):
            item = next(iter(result.values()))
            code = item.get("status", 0)
            if code in (200, 201):
                outcome.indexed += 1
            elif code == 409:
                outcome.duplicates += 1
            elif code == 429:
                outcome.retry.append(position)
            else:
                error = item.get("error", {})
                kind = error.get("type", str(code)) if isinstance(error, dict) else str(code)
                reason = error.get("reason", "") if isinstance(error, dict) else ""
                outcome.failed.append((position, kind, str(reason)))
        return outcome

    async def delete_by_query(self, field_name: str, value: str) -> int:
        """Delete every event whose ``field_name`` is ``value``; returns how many."""
        status, data = await self._request(
            "POST",
            f"/{self.settings.index_pattern}/_delete_by_query",
            body={"query": {"term": {field_name: value}}},
            params={"conflicts": "proceed", "refresh": "true", "allow_no_indices": "true"},
        )
        if status != 200:
            raise ClusterRejected(f"_delete_by_query: {status} {_error_type(data)}")
        return int(data.get("deleted", 0))
