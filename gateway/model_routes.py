"""The OpenAI model routes: from an authenticated request to a forwarded one.

One :class:`ModelEndpoint` per route (``POST /v1/chat/completions``...), a pure ASGI
app: read the body under the size cap, check it, resolve the model (404; canaries),
admit the caller (allow-lists 403, rate limits 429), shape the body sent upstream
(canary version, vLLM priority, usage in streams), forward, then settle the token count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.admission import Admission
from gateway.asgi import Receive, Scope, Send, offers_raw_headers, read_body, request_id_of
from gateway.audit_trail import AuditTrail, CallRecord
from gateway.errors import Forbidden, GatewayError, InvalidRequest
from gateway.middleware.auth import principal_of
from gateway.proxy import Forwarder, Outcome, ProxyRequest
from gateway.rbac import Principal
from gateway.schemas import _Body, parse_body
from gateway.upstreams import UpstreamPool
from gateway.usage import Usage
from gateway.watermark_check import WatermarkDetector

NO_USAGE = Usage(0, 0, 0)
# vLLM passes a body's "vllm_xargs" to logits processors; this one turns the watermark off.
WATERMARK_OPT_OUT = "bastion_watermark"


def _check_watermark_opt_out(body: dict[str, Any], principal: Principal) -> None:
    """Only roles holding ``watermark:opt_out`` may ask the inference tier for unmarked text."""
    extra = body.get("vllm_xargs")
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise InvalidRequest("vllm_xargs: must be an object", param="vllm_xargs")
    if WATERMARK_OPT_OUT in extra and not principal.has("watermark:opt_out"):
        raise Forbidden(
            f"vllm_xargs.{WATERMARK_OPT_OUT}: this key's roles may not turn the watermark off"
        )


class ModelEndpoint:
    def __init__(
        self,
        path: str,
        schema: type[_Body],
        forwarder: Forwarder,
        pool: UpstreamPool,
        admission: Admission,
        max_body_bytes: int,
        streams: bool,
        watermark: WatermarkDetector | None = None,
        audit: AuditTrail | None = None,
        restriction: Callable[[Principal], None] | None = None,
    ) -> None:
        self._path = path
        self._schema = schema
        self._forwarder = forwarder
        self._pool = pool
        self._admission = admission
        self._max_body_bytes = max_body_bytes
        self._streams = streams
        self._watermark = watermark
        self._audit = audit
        self._restriction = restriction
        """Raises for a subject whose processing is restricted (GDPR Art. 18)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(scope, receive, self._max_body_bytes)
        body = parse_body(raw, self._schema)
        principal = principal_of(scope)
        if self._audit is None:
            await self._forward(scope, receive, send, raw, body, principal, None)
            return
        call = self._audit.call(principal, self._path, request_id_of(scope), body)
        try:
            outcome = await self._forward(scope, receive, send, raw, body, principal, call)
        except GatewayError as exc:
            if not call.recorded:
                await call.refused(exc)  # durable before the error goes out
            raise
        if not call.recorded:
            # Cut short: the client left or the upstream failed after the first byte.
            cut = "client_gone" if outcome.client_gone else "upstream_failed"
            usage = outcome.usage
            await call.complete(
                outcome.status or 499,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                watermark=None,
                cut=cut,
            )

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw: bytes,
        body: dict[str, Any],
        principal: Principal,
        call: CallRecord | None,
    ) -> Outcome:
        if self._restriction is not None:
            self._restriction(principal)
        _check_watermark_opt_out(body, principal)
        requested = body["model"]
        if call is not None:
            call.model = requested
        model = self._pool.resolve_model(requested)
        if call is not None:
            call.model = model
        admitted = await self._admission.admit(
            principal, requested, body, offers_raw_headers(scope)
        )
        stream = self._streams and body.get("stream") is True

        changes: dict[str, Any] = {}
        if model != requested:
            changes["model"] = model
        if admitted.priority is not None:
            changes["priority"] = admitted.priority
        hide_usage_chunk = False
        if stream and self._admission.counts_tokens:
            options = body.get("stream_options") or {}
            if not options.get("include_usage"):
                changes["stream_options"] = {**options, "include_usage": True}
                hide_usage_chunk = True
        if changes:
            raw = orjson.dumps({**body, **changes})

        request = ProxyRequest(
            path=self._path,
            body=raw,
            model=model,
            stream=stream,
            request_id=request_id_of(scope),
            response_headers=admitted.response_headers,
            header_lines=admitted.header_lines,
            hide_usage_chunk=hide_usage_chunk,
            watermark=self._watermark.for_model(model) if self._watermark is not None else None,
            audit=call,
        )
        try:
            outcome = await self._forwarder.respond(request, send, receive)
        except GatewayError:
            # Nothing was generated: give the reserved tokens back.
            await self._admission.settle(principal, admitted, NO_USAGE)
            raise
        await self._admission.settle(principal, admitted, outcome.usage)
        return outcome
