"""The request checks every model call passes before it is forwarded, in this order.

Each implements :class:`gateway.pipeline.RequestCheck`: it may refuse the call (a
:class:`~gateway.errors.GatewayError`) or change the body sent upstream. ``build_app``
lists them; the input guards are one more, after admission (a call refused for its rate
never costs a scan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.admission import Admission, RateLimitRefusal
from gateway.errors import Forbidden, InvalidRequest, RateLimiterUnavailable
from gateway.pipeline import CallContext
from gateway.rbac import Principal
from gateway.upstreams import UpstreamPool
from gateway.usage import Usage

NO_USAGE = Usage(0, 0, 0)
"""Settles a call that generated nothing: everything reserved is given back."""
# vLLM passes a body's "vllm_xargs" to logits processors; this one turns the watermark off.
WATERMARK_OPT_OUT = "bastion_watermark"
# vLLM's scheduling priority (lower runs first); a client may set it only with this.
PRIORITY_PERMISSION = "priority:set"


class RestrictionCheck:
    """A subject whose processing is restricted (GDPR Art. 18) is refused."""

    def __init__(self, restriction: Callable[[Principal], None]) -> None:
        self._restriction = restriction

    async def check(self, call: CallContext) -> None:
        self._restriction(call.principal)


class WatermarkOptOutCheck:
    """Only roles holding ``watermark:opt_out`` may ask the inference tier for unmarked text."""

    async def check(self, call: CallContext) -> None:
        extra = call.body.get("vllm_xargs")
        if extra is None:
            return
        if not isinstance(extra, dict):
            raise InvalidRequest("vllm_xargs: must be an object", param="vllm_xargs")
        if WATERMARK_OPT_OUT in extra and not call.principal.has("watermark:opt_out"):
            raise Forbidden(
                f"vllm_xargs.{WATERMARK_OPT_OUT}: this key's roles may not turn the watermark off"
            )


class ModelResolution:
    """The requested model must be served (404); a canary may take the call."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def check(self, call: CallContext) -> None:
        requested = call.body["model"]
        call.event.model = requested
        served = self._pool.resolve_model(requested)
        call.event.model_served = served
        if served != requested:
            call.change("model", served)


class AdmissionCheck:
    """Allow-lists (403), rate limits (429) and the key's scheduling priority.

    The tokens reserved for the rate limit are settled with the usage the upstream
    reports, or given back when a later step refuses the call. The key's tier decides
    vLLM's ``priority``: a client's own value is replaced unless a role permits it.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def check(self, call: CallContext) -> None:
        principal, event = call.principal, call.event
        try:
            admitted = await self._admission.admit(principal, call.body["model"], call.body)
        except RateLimitRefusal as exc:
            event.ratelimit = "limited"
            event.ratelimit_bucket = exc.bucket
            raise
        except RateLimiterUnavailable:
            event.ratelimit = "unavailable"
            raise
        event.ratelimit = admitted.outcome
        if "priority" in call.body and not principal.has(PRIORITY_PERMISSION):
            call.change("priority", admitted.priority or 0)
        elif admitted.priority is not None:
            call.change("priority", admitted.priority)
        if admitted.rate_headers is not None:
            call.header_blocks.append(admitted.rate_headers)
        if self._admission.counts_tokens:

            async def settle(usage: Usage | None) -> None:
                await self._admission.settle(principal, admitted, usage)

            call.settlements.append(settle)
            if call.stream:
                self._ask_for_usage(call)

    @staticmethod
    def _ask_for_usage(call: CallContext) -> None:
        """A stream reports its usage only when asked: ask, and hide it if the client didn't."""
        options: Any = call.body.get("stream_options") or {}
        if not options.get("include_usage"):
            call.change("stream_options", {**options, "include_usage": True})
            call.hide_usage_chunk = True
