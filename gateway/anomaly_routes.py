"""``GET /compliance/anomalies``: the anomaly detector's flags, for auditors and admins.

Query: ``since``/``until`` (ISO 8601, on the flagged window's end), ``key``, ``model``,
``family`` (volume, size, latency, safety, quality, timing), ``limit`` (1-1000, default
100) and ``cursor`` (the previous page's ``next_cursor``). Newest first. The answer also
says whether the detector is active or still in its cold start (``status``), so an empty
list is never mistaken for "nothing happened". Each flag carries its explanation (SHAP
attributions, the baseline's share, the cause family) and the ids of its window's
requests, which ``GET /compliance/audit?request_id=...`` opens.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import InvalidRequest
from gateway.query_params import limit_param, time_param
from gateway.schemas import query_name
from monitors.anomaly import store
from monitors.anomaly.features import FAMILIES
from monitors.anomaly.scorer import detector_status, iso
from monitors.anomaly.settings import AnomalySettings


def flag_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "anomaly",
        "time": iso(row["time_us"]),
        "window_start": iso(row["window_start_us"]),
        "key_id": row["key_id"],
        "model": row["model"],
        "family": row["family"],
        "score": row["score"],
        "threshold": row["threshold"],
        "model_version": row["model_version"],
        "requests": row["requests"],
        "request_ids": row["request_ids"],
        "explanation": row["explanation"],
    }


class AnomalyRoutes:
    def __init__(self, engine: Engine, settings: AnomalySettings) -> None:
        self._engine = engine
        self._settings = settings

    async def list(self, request: Request) -> Response:
        params = request.query_params
        family = query_name(params, "family")
        if family is not None and family not in FAMILIES:
            raise InvalidRequest(f"family: one of {', '.join(FAMILIES)}", param="family")
        where = store.AnomalyFilter(
            since_us=time_param(request, "since"),
            until_us=time_param(request, "until"),
            key_id=query_name(params, "key"),
            model=query_name(params, "model"),
            family=family,
        )
        limit = limit_param(request)
        cursor = query_name(params, "cursor")
        try:
            rows, next_cursor = await asyncio.to_thread(
                store.query_anomalies, self._engine, where, limit, cursor
            )
        except store.BadCursor:
            raise InvalidRequest("cursor: not one this API returned", param="cursor") from None
        status = await asyncio.to_thread(detector_status, self._engine, self._settings)
        return JSONResponse(
            {
                "object": "list",
                "status": status,
                "data": [flag_json(row) for row in rows],
                "next_cursor": next_cursor,
            }
        )
