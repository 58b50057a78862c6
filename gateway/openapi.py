"""The gateway's OpenAPI 3.1 document, generated from its route table and request models.

Every route the app serves (``BastionApp.route_permissions()``: method, path template,
permission) becomes an operation: its path parameters (identifiers, see
:data:`gateway.schemas.MAX_NAME_LENGTH`), the query parameters it reads, its request body
as the pydantic model the route parses it with (the OpenAI routes: the fields the gateway
checks; any other field is passed on to the model server as is), its success answer, and
every error in OpenAI's shape. ``x-permission`` names the permission the route needs.

Nothing here is written by hand per route but the table of query parameters and success
statuses: :func:`openapi_document` refuses a route it has no request model or "no body"
entry for, so a new route cannot go undocumented (tests/gateway/test_openapi.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from gateway.admin_routes import CreateKeyRequest
from gateway.privacy_requests import Completion, LoggedRequest, Reason
from gateway.privacy_routes import DoNotSell, Rectification
from gateway.report_routes import ExportRequest
from gateway.schemas import (
    MAX_NAME_LENGTH,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from gateway.watermark.endpoint import DetectRequest

OPENAPI_VERSION = "3.1.0"
NO_BODY = None
"""A route that reads no request body."""

SUBJECT = "/privacy/subjects/{subject_id}"
REQUEST_BODIES: Mapping[tuple[str, str], type[BaseModel] | None] = {
    ("POST", "/v1/chat/completions"): ChatCompletionRequest,
    ("POST", "/v1/completions"): CompletionRequest,
    ("POST", "/v1/embeddings"): EmbeddingRequest,
    ("POST", "/v1/watermark/detect"): DetectRequest,
    ("POST", "/admin/keys"): CreateKeyRequest,
    ("POST", "/compliance/exports"): ExportRequest,
    ("PATCH", SUBJECT): Rectification,
    ("POST", f"{SUBJECT}/restrict"): Reason,
    ("PUT", f"{SUBJECT}/do-not-sell"): DoNotSell,
    ("PUT", f"{SUBJECT}/legal-hold"): Reason,
    ("POST", "/privacy/requests"): LoggedRequest,
    ("POST", "/privacy/requests/{request_id}/complete"): Completion,
    ("POST", "/privacy/requests/{request_id}/extend"): Reason,
}
"""The model each route with a body parses it with; any other route reads none."""

_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME_LENGTH,
    "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
}
_ISO_TIME = {"type": "string", "format": "date-time"}
_FLAG = {"type": "string", "enum": ["true", "false", "1", "0"]}

QUERY_PARAMETERS: Mapping[tuple[str, str], Mapping[str, dict[str, Any]]] = {
    ("GET", "/admin/keys"): {"include_revoked": _FLAG},
    ("GET", "/compliance/audit"): {
        "subject": _NAME,
        "key": _NAME,
        "request_id": _NAME,
        "kind": _NAME,
        "since": _ISO_TIME,
        "until": _ISO_TIME,
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        "cursor": {"type": "string", "maxLength": 512},
        "payloads": _FLAG,
        "reason": {**_NAME, "maxLength": 1024},
    },
    ("GET", "/compliance/reports/ai-act"): {
        "format": {"type": "string", "enum": ["markdown", "md", "html"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3660},
    },
    ("GET", "/privacy/requests"): {"subject": _NAME, "status": _NAME},
}

CREATED = {("POST", "/admin/keys"), ("POST", "/privacy/requests")}
_JSON = "application/json"
SUCCESS_MEDIA_TYPES: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/v1/chat/completions"): (_JSON, "text/event-stream"),
    ("POST", "/v1/completions"): (_JSON, "text/event-stream"),
    ("GET", "/metrics"): ("text/plain",),
    ("POST", "/compliance/exports"): ("application/x-tar",),
    ("GET", "/compliance/reports/ai-act"): ("text/markdown", "text/html"),
}
"""Answers that are not JSON (or not only)."""

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


def _operation_id(method: str, path: str) -> str:
    return method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")


def _model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON Schema, its definitions moved to ``components/schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(
    method: str, path: str, permission: str, components: dict[str, Any]
) -> dict[str, Any]:
    key = (method, path)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _NAME}
        for name in re.findall(r"{(\w+)}", path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in QUERY_PARAMETERS.get(key, {}).items()
    ]
    status = "201" if key in CREATED else "200"
    media_types = SUCCESS_MEDIA_TYPES.get(key, (_JSON,))
    operation: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "summary": f"{method} {path}",
        "x-permission": permission,
        "parameters": parameters,
        "responses": {
            status: {
                "description": "Success.",
                "content": {media: {"schema": {}} for media in media_types},
            },
            "default": {
                "description": "An error, in OpenAI's error shape.",
                "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if permission != "public":
        operation["security"] = [{"bearer": []}]
    model = REQUEST_BODIES.get(key)
    if model is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {_JSON: {"schema": _model_schema(model, components)}},
        }
    return operation


def openapi_document(
    routes: Iterable[tuple[str, str, str]], *, title: str = "Bastion", version: str = "1"
) -> dict[str, Any]:
    """OpenAPI 3.1 for ``routes`` (``(method, path template, permission)`` each)."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, permission in routes:
        paths.setdefault(path, {})[method.lower()] = _operation(
            method, path, permission, components
        )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "A secure LLM gateway: OpenAI-compatible model routes, "
            "administration, audit and data-subject rights.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key."}
            },
        },
    }
