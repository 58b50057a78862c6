"""Who may do what: the principal behind a request, permissions per role, model allow-lists.

Every route names one permission (see ``permission=`` in gateway/app.py); this table
says which roles hold it. ``public`` routes need no key. A data subject acting on their
own data (``/privacy/subjects/{their id}``) is allowed by ``privacy:self`` whatever
their roles. ``watermark:opt_out`` belongs to no route: it lets a model call turn the
inference tier's watermark off (``"vllm_xargs": {"bastion_watermark": "off"}``).
``priority:set`` belongs to no route either: it lets a model call keep its own vLLM
``priority``; anyone else's is replaced by the key tier's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import ROLES

Permission = Literal[
    "public",
    "models:call",
    "models:list",
    "watermark:detect",
    "watermark:opt_out",
    "keys:manage",
    "upstreams:read",
    "audit:read",
    "privacy:manage",
    "privacy:self",
    "metrics:read",
    "priority:set",
    "keys:manage_privileged",
    "anomalies:read",
]

ROLE_PERMISSIONS: Mapping[str, frozenset[str]] = {
    "admin": frozenset(
        {
            "models:call",
            "models:list",
            "watermark:detect",
            "watermark:opt_out",
            "keys:manage",
            "upstreams:read",
            "metrics:read",
            "priority:set",
            "anomalies:read",
        }
    ),
    "model_admin": frozenset(
        {
            "models:call",
            "models:list",
            "watermark:detect",
            "watermark:opt_out",
            "upstreams:read",
            "metrics:read",
            "priority:set",
        }
    ),
    "data_scientist": frozenset(
        {"models:call", "models:list", "watermark:detect", "watermark:opt_out"}
    ),
    "app": frozenset({"models:call", "models:list"}),
    "auditor": frozenset(
        {
            "models:list",
            "watermark:detect",
            "audit:read",
            "privacy:manage",
            "metrics:read",
            "anomalies:read",
        }
    ),
}
assert set(ROLE_PERMISSIONS) == set(ROLES)


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: an API key, or a client certificate mapped to one."""

    key_id: str
    roles: frozenset[str]
    subject_id: str | None
    models: frozenset[str] | None
    """The key's own allow-list; None means whatever its roles allow."""
    tier: str
    via: Literal["key", "certificate", "dev"] = "key"
    permissions: frozenset[str] = field(init=False)
    """Everything the roles allow, worked out once: checked on every request."""

    def __post_init__(self) -> None:
        granted = frozenset({"public"}).union(*(ROLE_PERMISSIONS[r] for r in self.roles))
        object.__setattr__(self, "permissions", granted)

    def has(self, permission: str) -> bool:
        return permission in self.permissions


class ModelPolicy:
    """Per-key and per-role model allow-lists; a model must pass both."""

    def __init__(self, role_models: Mapping[Any, list[str]]) -> None:
        self._role_models = {role: frozenset(models) for role, models in role_models.items()}

    def allows(self, principal: Principal, model: str) -> bool:
        if principal.models is not None and model not in principal.models:
            return False
        # The roles allow a model when any of the caller's model-calling roles does.
        for role in principal.roles:
            if "models:call" not in ROLE_PERMISSIONS[role]:
                continue
            allowed = self._role_models.get(role)
            if allowed is None or "*" in allowed or model in allowed:
                return True
        return False


def permission_table(routes: list[tuple[str, str, str]]) -> str:
    """The README's Markdown table: each ``(method, path, permission)`` against each role."""
    roles = list(ROLE_PERMISSIONS)
    lines = [
        "| route | permission | " + " | ".join(roles) + " |",
        "|---|---|" + "---|" * len(roles),
    ]
    for method, path, permission in routes:
        cells = [
            "✓" if permission == "public" or permission in ROLE_PERMISSIONS[role] else ""
            for role in roles
        ]
        lines.append(f"| `{method} {path}` | {permission} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
