"""The upstream pool: which upstream serves a model, chosen by weight among usable ones.

An upstream is usable when its active health check passes and its circuit breaker lets
traffic through. Canaries send a configured share of a model's traffic to a named
version (another model name served by the pool).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.config import Settings, UpstreamSettings
from gateway.errors import ModelNotFound


@dataclass(eq=False)
class Upstream:
    settings: UpstreamSettings
    breaker: CircuitBreaker
    healthy: bool = True
    """Set by the health checker; upstreams start healthy so start-up order does not matter."""
    probe_failures: int = 0
    probe_successes: int = 0
    last_probe_error: str | None = None
    request_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.settings.api_key:
            self.request_headers["authorization"] = f"Bearer {self.settings.api_key}"

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def usable(self) -> bool:
        return self.healthy and self.breaker.available()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.base_url,
            "models": list(self.settings.models),
            "weight": self.settings.weight,
            "healthy": self.healthy,
            "breaker": str(self.breaker.state),
            "consecutive_failures": self.breaker.consecutive_failures,
            "last_probe_error": self.last_probe_error,
        }


class UpstreamPool:
    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        breaker = settings.circuit_breaker
        self.upstreams = [
            Upstream(u, CircuitBreaker(breaker.failure_threshold, breaker.open_s))
            for u in settings.upstreams
        ]
        self._by_model: dict[str, list[Upstream]] = {}
        for upstream in self.upstreams:
            for model in upstream.settings.models:
                self._by_model.setdefault(model, []).append(upstream)
        self._canaries = {c.model: c for c in settings.canaries}
        self._rng = rng or random.Random()

    def models(self) -> list[str]:
        return list(self._by_model)

    def resolve_model(self, model: str) -> str:
        """The model name to send upstream: the requested one, or its canary version."""
        if model not in self._by_model:
            raise ModelNotFound(f"The model '{model}' does not exist or is not served here.")
        canary = self._canaries.get(model)
        if canary is not None and self._rng.random() < canary.share:
            return canary.version
        return model

    def choose(self, model: str, exclude: frozenset[Upstream] = frozenset()) -> Upstream | None:
        """Pick a usable upstream for ``model`` by weight and reserve it with its breaker."""
        candidates = [u for u in self._by_model.get(model, ()) if u not in exclude and u.usable()]
        while candidates:
            total = sum(u.settings.weight for u in candidates)
            point = self._rng.random() * total
            chosen = candidates[-1]
            for upstream in candidates:
                point -= upstream.settings.weight
                if point < 0:
                    chosen = upstream
                    break
            if chosen.breaker.acquire():
                return chosen
            candidates.remove(chosen)
        return None

    def ready(self) -> tuple[bool, dict[str, bool]]:
        """Whether every model has an upstream that could take a request now."""
        per_model = {
            model: any(u.healthy and u.breaker.state is not BreakerState.OPEN for u in ups)
            for model, ups in self._by_model.items()
        }
        return all(per_model.values()), per_model
