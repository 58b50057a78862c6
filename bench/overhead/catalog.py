"""The targets the benchmark knows, what each Bastion variant turns on, and which are
compared with which (the access chain against the bare proxy, each feature on against off).
"""

from __future__ import annotations

from typing import Any

SCENARIOS = ("chat", "stream")

# The default chain with a feature switched off, by the setting that switches it off.
# Metrics have no setting that turns them off (the metrics sink is always registered,
# gateway/app.py): "telemetry" here is the access log, and event shipping, which is off
# unless events.url is set.
FEATURE_BASE = "bastion-secure"
FEATURE_OFF: dict[str, tuple[str, dict[str, Any]]] = {
    "bastion-secure-no-telemetry": ("telemetry", {"logging": {"access_log": False}}),
    "bastion-secure-no-guards": ("guards", {"guards": {"enabled": False}}),
}

DEFAULT_TARGETS = ("direct", "nginx", "litellm", "bastion-bare", "bastion", "bastion-secure")
ALL_TARGETS = (*DEFAULT_TARGETS, *FEATURE_OFF)
BASTIONS = ("bastion-bare", "bastion", "bastion-secure", *FEATURE_OFF)
GATEWAYS = ("nginx", "litellm", *BASTIONS)
VARIANT_WHAT = {
    "bastion-bare": "bare proxy: no TLS, no auth, no rate limits",
    "bastion": "plain HTTP: key check + RBAC + in-memory rate limits",
    "bastion-secure": "TLS + key check + RBAC with allow-lists + rate limits in Redis",
    "bastion-secure-no-telemetry": "bastion-secure with logging.access_log: false",
    "bastion-secure-no-guards": "bastion-secure with guards.enabled: false",
}
CHAIN_BASE = "bastion-bare"  # the access chain's cost is measured against this one
CHAIN_VARIANTS = ("bastion-secure", "bastion")
