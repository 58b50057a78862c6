"""The configurations chain_instructions.py counts: the variants, and switches that turn one
feature off (``-guards-off``, ``-no-telemetry``)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

VARIANTS = ("bare", "bastion", "bastion-redis")
# Suffixes of a variant's name that turn one feature off (see the module docstring).
SWITCHES: dict[str, dict[str, Any]] = {
    "-guards-off": {"guards": {"enabled": False}},
    "-no-telemetry": {"logging": {"access_log": False}},
}
SOCKET_VARIANTS = (*VARIANTS, "bastion-secure")
MODEL = "m1"


def split_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """The base variant (one of SOCKET_VARIANTS) and the settings its switches change."""
    changes: dict[str, Any] = {}
    base = variant
    while True:
        suffix = next((s for s in SWITCHES if base.endswith(s)), None)
        if suffix is None:
            break
        base = base[: -len(suffix)]
        changes = deep_merge(changes, SWITCHES[suffix])
    if base not in SOCKET_VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r}: one of {', '.join(SOCKET_VARIANTS)},"
            f" optionally followed by {' '.join(SWITCHES)}"
        )
    return base, changes


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def settings_for(
    variant: str,
    workdir: Path,
    redis_url: str,
    upstream: str = "http://127.0.0.1:9",
    extra: dict[str, Any] | None = None,
) -> Any:
    """The settings of ``variant`` (switches included), with ``extra`` merged in last."""
    from gateway.config import Settings

    variant, changes = split_variant(variant)

    never_throttle = {"requests_per_second": 1e9, "burst": 10**9, "tokens_per_minute": 10**12}
    common: dict[str, Any] = {
        "upstreams": [{"name": "a", "url": upstream, "models": [MODEL]}],
        "database_url": f"sqlite:///{workdir / 'bastion.db'}",
        "health_check": {"enabled": False},
        "audit": {"enabled": False},
        "master_key": base64.b64encode(b"b" * 32).decode(),
        # No refresh during the count: its thread would add work that depends on time.
        "auth": {"key_refresh_s": 3600},
    }
    if variant == "bare":
        common.update(dev=True, auth={"enabled": False}, rate_limits={"enabled": False})
    elif variant == "bastion":
        common["rate_limits"] = never_throttle
    else:
        common["auth"]["role_models"] = {"app": [MODEL]}
        # Closed: a Redis failure shows as an error, not as a cheaper gateway. Valgrind
        # runs the gateway some 50 times slower: no reply is late for that.
        common["rate_limits"] = {
            **never_throttle,
            "redis_failure_mode": "closed",
            "redis_timeout_s": 30,
        }
        common["redis_url"] = redis_url
    if variant == "bastion-secure":
        import trustme

        leaf = trustme.CA().issue_cert("127.0.0.1")
        certfile, keyfile = workdir / "cert.pem", workdir / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(certfile))
        leaf.private_key_pem.write_to_path(str(keyfile))
        common["server"] = {"tls": {"certfile": str(certfile), "keyfile": str(keyfile)}}
    return Settings(**deep_merge(deep_merge(common, changes), extra or {}))
