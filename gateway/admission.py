"""Admission of a model call: allow-lists, rate limits and scheduling priority.

:meth:`Admission.admit` runs after authentication, before anything is forwarded; it
refuses a model outside the caller's allow-lists (403) or over its rate limits (429,
or 503 when the limiter's backend is down and set to fail closed), and says what to add
to the request (vLLM ``priority``) and to the response (``x-ratelimit-*``).
:meth:`Admission.settle` corrects the token bucket from the usage the upstream reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.config import Settings
from gateway.errors import Forbidden, RateLimited, RateLimiterUnavailable
from gateway.pipeline import HeaderBlock
from gateway.rbac import ModelPolicy, Principal
from gateway.usage import Usage, estimate_tokens
from monitors.request_event import RateLimitOutcome

if TYPE_CHECKING:
    from gateway.ratelimit import RateLimiter


@dataclass(slots=True)
class Admitted:
    reserved_tokens: int
    priority: int | None
    rate_headers: HeaderBlock | None = None
    """The ``x-ratelimit-*`` headers for the answer (None: none to send). One object; the
    wire boundary (the forwarder) writes it as pairs or as lines, as the server takes."""
    outcome: RateLimitOutcome = "off"


class RateLimitRefusal(RateLimited):
    """A 429 that says which bucket ran dry (``requests`` or ``tokens``), for the metrics."""

    def __init__(self, message: str, headers: list[tuple[bytes, bytes]], bucket: str) -> None:
        super().__init__(message, headers)
        self.bucket = bucket


class Admission:
    def __init__(
        self, settings: Settings, limiter: RateLimiter | None, policy: ModelPolicy | None = None
    ) -> None:
        self._policy = policy or ModelPolicy(settings.auth.role_models)
        self._limiter = limiter
        self._tiers = settings.priority.tiers if settings.priority.enabled else {}
        self._headers_always = settings.rate_limits.response_headers == "always"

    @property
    def counts_tokens(self) -> bool:
        return self._limiter is not None

    async def admit(self, principal: Principal, model: str, body: dict[str, Any]) -> Admitted:
        if not self._policy.allows(principal, model):
            raise Forbidden(
                f"Your key is not allowed to use the model '{model}'.", code="model_not_allowed"
            )
        priority = self._tiers.get(principal.tier) or None
        if self._limiter is None:
            return Admitted(0, priority)
        reserved = estimate_tokens(body)
        decision = await self._limiter.check(principal.key_id, reserved)
        if decision.allowed:
            outcome: RateLimitOutcome = "failed_open" if decision.degraded else "allowed"
            headers = decision if self._headers_always else None
            return Admitted(reserved, priority, headers, outcome)
        headers = decision.headers()
        if decision.degraded:
            raise RateLimiterUnavailable("Rate limiting is unavailable; try again.")
        raise RateLimitRefusal(
            "Rate limit reached for your key: "
            f"{decision.limit_requests} requests and {decision.limit_tokens} tokens "
            "allowed; see the x-ratelimit-* headers.",
            headers,
            "requests" if decision.remaining_requests < 1 else "tokens",
        )

    async def settle(self, principal: Principal, admitted: Admitted, usage: Usage | None) -> None:
        """Replace the estimate by the real count (nothing is known: keep the estimate)."""
        if self._limiter is None or usage is None:
            return
        delta = usage.total_tokens - admitted.reserved_tokens
        if delta:
            await self._limiter.adjust(principal.key_id, delta)
