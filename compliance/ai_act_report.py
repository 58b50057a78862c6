"""The EU AI Act report: the live configuration and figures measured from the audit log.

The gateway hands in :class:`SystemFacts` (plain values from its settings, so this
package never imports it); :func:`measure` computes the figures with SQL aggregates over
the entries' clear metadata (no payload is decrypted); :func:`render_markdown` writes the
report. Articles: 9 (risk management), 10 (data governance), 12 and 19 (record-keeping,
logs kept at least six months), 13 and 50 (transparency), 14 (human oversight), 15
(accuracy, robustness, cybersecurity).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, case, func, select

from compliance.audit_schema import checkpoints, entries
from compliance.export_format import iso_time
from compliance.markdown_html import render_document
from compliance.markdown_html import table_cell as cell
from compliance.records import REQUEST, now_us

MIN_RETENTION_DAYS = 180
"""Art. 19(1) / 26(6): logs of high-risk systems kept at least six months."""
_DAY_US = 86_400_000_000


@dataclass(frozen=True, slots=True)
class UpstreamFacts:
    name: str
    models: tuple[str, ...]
    weight: float


@dataclass(frozen=True, slots=True)
class SystemFacts:
    """What the gateway is configured to do, as plain values."""

    version: str
    models: tuple[str, ...]
    upstreams: tuple[UpstreamFacts, ...]
    roles: Mapping[str, tuple[str, ...]]
    """Each role and the permissions it holds."""
    auth_enabled: bool
    tls: bool
    client_certificates: str
    rate_limits: str | None
    audit_enabled: bool
    audit_payloads: bool
    retention_days: int
    checkpoint_every_entries: int
    checkpoint_every_s: float
    database: str
    watermark_enabled: bool
    watermark_gamma: float
    watermark_delta: float
    watermark_z_threshold: float
    events_shipped: bool = False
    """A shipper is running in this gateway (not merely configured)."""
    events_status: str = "off"
    """What the running shipper does now: delivering, spooling (the cluster is down or
    slow: events wait on disk), starting, or off."""
    event_sinks: tuple[str, ...] = ()
    """Where this gateway's request events go (audit, metrics, events...), as registered."""
    retention_interval_s: float = 0.0
    """How often the gateway applies retention itself; 0: only ``bastion audit retention``."""
    guards: tuple[str, ...] = ()
    anomaly_detection: bool = False
    watermark_counter: Mapping[str, float] = field(default_factory=dict)
    """This process's bastion_watermark_verdicts_total, by verdict (since it started)."""


@dataclass(slots=True)
class Figures:
    days: int
    since_us: int
    until_us: int
    statuses: dict[str, int] = field(default_factory=dict)
    """Model calls by status class (2xx, 4xx, 5xx...)."""
    watermark: dict[str, int] = field(default_factory=dict)
    """Successful model calls by watermark verdict: watermarked, absent, not scored."""
    guard_verdicts: int = 0
    models: dict[str, int] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)
    checkpoints: int = 0
    chains: int = 0
    last_checkpoint_us: int | None = None
    oldest_entry_us: int | None = None

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


def measure(engine: Engine, days: int = 30, until_us: int | None = None) -> Figures:
    """Figures over the ``days`` before ``until_us`` (default now)."""
    until = until_us if until_us is not None else now_us()
    figures = Figures(days, until - days * _DAY_US, until)
    window = (entries.c.time_us >= figures.since_us, entries.c.time_us < until)
    calls = (*window, entries.c.kind == REQUEST)
    status_class = entries.c.status // 100  # integer division in SQLite and PostgreSQL
    verdict = case(
        (entries.c.watermark.like("watermarked%"), "watermarked"),
        (entries.c.watermark.like("absent%"), "absent"),
        else_="not scored",
    )
    with engine.connect() as connection:
        for klass, count in connection.execute(
            select(status_class, func.count()).where(*calls).group_by(status_class)
        ):
            label = "no status" if klass is None else f"{int(klass)}xx"
            figures.statuses[label] = figures.statuses.get(label, 0) + count
        ok = (*calls, entries.c.status >= 200, entries.c.status < 300)
        for name, count in connection.execute(
            select(verdict, func.count()).where(*ok).group_by(verdict)
        ):
            figures.watermark[name] = count
        figures.guard_verdicts = connection.execute(
            select(func.count()).where(*calls, entries.c.guard.is_not(None))
        ).scalar_one()
        for model, count in connection.execute(
            select(entries.c.model, func.count()).where(*calls).group_by(entries.c.model)
        ):
            figures.models[model or "(none)"] = count
        for kind, count in connection.execute(
            select(entries.c.kind, func.count())
            .where(*window, entries.c.kind != REQUEST)
            .group_by(entries.c.kind)
        ):
            figures.actions[kind] = count
        row = connection.execute(
            select(
                func.count(),
                func.count(checkpoints.c.writer_id.distinct()),
                func.max(checkpoints.c.time_us),
            )
        ).one()
        figures.checkpoints, figures.chains, figures.last_checkpoint_us = row
        figures.oldest_entry_us = connection.execute(select(func.min(entries.c.time_us))).scalar()
    return figures


def render_html(markdown: str) -> str:
    return render_document(markdown, "EU AI Act report: Bastion LLM gateway")


def share(part: int, whole: int) -> str:
    return "n/a (no data)" if whole == 0 else f"{100 * part / whole:.1f} %"


def _when(time_us: int | None) -> str:
    return "never" if time_us is None else iso_time(time_us)


def render_markdown(facts: SystemFacts, figures: Figures, generated_us: int) -> str:
    """The report as Markdown."""
    out: list[str] = [
        "# EU AI Act report: Bastion LLM gateway",
        "",
        f"Generated {iso_time(generated_us)} from the live configuration and the audit "
        f"log over the last {figures.days} days ({iso_time(figures.since_us)} to "
        f"{iso_time(figures.until_us)}). Figures are counted from the entries' clear "
        "metadata; no payload was decrypted.",
        "",
    ]
    out += _system(facts, figures)
    out += _risk(facts, figures)
    out += _data(facts)
    out += _records(facts, figures)
    out += _transparency(facts, figures)
    out += _oversight(facts, figures)
    out += _accuracy(figures)
    out += ["## Open gaps", "", *(f"- {gap}" for gap in open_gaps(facts, figures)), ""]
    return "\n".join(out)


def _system(facts: SystemFacts, figures: Figures) -> list[str]:
    lines = [
        "## 1. System description",
        "",
        f"- Bastion version: `{facts.version}`",
        f"- Models served: {', '.join(f'`{m}`' for m in facts.models) or 'none'}",
        f"- Authentication: {'API keys (RBAC)' if facts.auth_enabled else '**off** (dev setup)'}",
        f"- TLS on the listener: {'on' if facts.tls else 'off'}; client certificates: "
        f"{facts.client_certificates}",
        f"- Rate limits: {facts.rate_limits or 'off'}",
        "",
        "| upstream | models | weight |",
        "|---|---|---|",
    ]
    for up in facts.upstreams:
        lines.append(f"| {cell(up.name)} | {cell(', '.join(up.models))} | {up.weight:g} |")
    lines += ["", "| model | calls in the period |", "|---|---|"]
    lines += [f"| {cell(m)} | {n} |" for m, n in sorted(figures.models.items())]
    return [*lines, ""]


def _risk(facts: SystemFacts, figures: Figures) -> list[str]:
    lines = ["## 2. Risk management (Art. 9)", ""]
    if not facts.guards:
        lines.append(
            "- **Input and output guards are not implemented yet**: no prompt or answer is "
            "scanned, so no block rate can be measured (open gap)."
        )
    else:
        lines.append(f"- Guards configured: {', '.join(facts.guards)}")
    lines.append(
        f"- Calls with a guard verdict recorded in the period: {figures.guard_verdicts} of "
        f"{figures.requests}"
    )
    return [*lines, ""]


def _data(facts: SystemFacts) -> list[str]:
    payloads = (
        "prompts and answers are stored encrypted (AES-256-GCM, one data key per subject, "
        "wrapped by the master key; erasure destroys the key)"
        if facts.audit_payloads
        else "prompts and answers are **not** stored (audit.payloads is off)"
    )
    return [
        "## 3. Data governance (Art. 10)",
        "",
        f"- Audit log: {'on' if facts.audit_enabled else '**off**'}, in {facts.database}",
        f"- Payloads: {payloads}",
        "- Metadata in clear: time, request id, key id, subject pseudonym, model, route, "
        "status, token counts, latencies, guard and watermark verdicts",
        f"- Retention: {facts.retention_days} days, enforced {_retention_schedule(facts)}",
        f"- Events shipped to Elasticsearch/OpenSearch: "
        f"{'yes, ' + facts.events_status if facts.events_shipped else 'no'}",
        f"- Request events go to: {', '.join(facts.event_sinks) or 'nowhere'}",
        "",
    ]


def _records(facts: SystemFacts, figures: Figures) -> list[str]:
    lines = ["## 4. Record-keeping (Art. 12, 19)", ""]
    if facts.retention_days < MIN_RETENTION_DAYS:
        lines += [
            f"> **Warning**: logs are kept {facts.retention_days} days; high-risk systems "
            f"must keep them at least six months ({MIN_RETENTION_DAYS} days, Art. 19). "
            "Raise audit.retention_days.",
            "",
        ]
    lines += [
        "- Logged per request: one entry per model call and per administrative or "
        "compliance action, durable before the answer completes",
        f"- Retention: {facts.retention_days} days",
        f"- Tamper evidence: SHA-256 hash chain per writer; Ed25519 checkpoint every "
        f"{facts.checkpoint_every_entries} entries or {facts.checkpoint_every_s:g} s",
        f"- Checkpoints stored: {figures.checkpoints} over {figures.chains} chain(s); "
        f"last signed {_when(figures.last_checkpoint_us)}",
        f"- Oldest entry kept: {_when(figures.oldest_entry_us)}",
        "- Last full verification: not run by this report (it reads the whole log); "
        "see `GET /compliance/audit/verify` or `bastion audit verify`",
        "",
    ]
    return lines


def _transparency(facts: SystemFacts, figures: Figures) -> list[str]:
    scored = figures.watermark.get("watermarked", 0) + figures.watermark.get("absent", 0)
    lines = ["## 5. Transparency (Art. 50)", ""]
    if facts.watermark_enabled:
        lines.append(
            f"- Watermarking: on (green-list scheme, gamma {facts.watermark_gamma:g}, "
            f"delta {facts.watermark_delta:g}, detection threshold z >= "
            f"{facts.watermark_z_threshold:g})"
        )
    else:
        lines.append("- Watermarking: **off**: generated text carries no machine-readable mark")
    lines += [
        f"- Successful calls scored in the period: {scored}; watermarked: "
        f"{figures.watermark.get('watermarked', 0)} "
        f"({share(figures.watermark.get('watermarked', 0), scored)}); absent: "
        f"{figures.watermark.get('absent', 0)}; not scored: "
        f"{figures.watermark.get('not scored', 0)}",
    ]
    counter = facts.watermark_counter
    if counter:
        total = int(sum(counter.values()))
        mark = int(counter.get("watermarked", 0))
        lines.append(
            f"- This gateway process since it started (bastion_watermark_verdicts_total): "
            f"{mark} of {total} watermarked ({share(mark, total)})"
        )
    return [*lines, ""]


def _oversight(facts: SystemFacts, figures: Figures) -> list[str]:
    lines = [
        "## 6. Human oversight (Art. 14)",
        "",
        "| role | permissions |",
        "|---|---|",
    ]
    for role, permissions in facts.roles.items():
        lines.append(f"| {cell(role)} | {cell(', '.join(sorted(permissions)))} |")
    lines += ["", "Administrative and compliance actions recorded in the period:", ""]
    if figures.actions:
        lines += [f"- `{kind}`: {n}" for kind, n in sorted(figures.actions.items())]
    else:
        lines.append("- none")
    return [*lines, ""]


def _accuracy(figures: Figures) -> list[str]:
    lines = [
        "## 7. Accuracy and robustness (Art. 15)",
        "",
        f"Model calls in the period: {figures.requests}",
        "",
        "| status class | calls | share |",
        "|---|---|---|",
    ]
    for klass, n in sorted(figures.statuses.items()):
        lines.append(f"| {klass} | {n} | {share(n, figures.requests)} |")
    return [*lines, ""]


def _retention_schedule(facts: SystemFacts) -> str:
    if facts.retention_interval_s <= 0:
        return "only when `bastion audit retention` is run (the gateway's schedule is off)"
    hours = facts.retention_interval_s / 3600
    every = f"{hours:g} h" if hours >= 1 else f"{facts.retention_interval_s:g} s"
    return f"by the gateway every {every} (one process at a time)"


def open_gaps(facts: SystemFacts, figures: Figures) -> list[str]:
    gaps: list[str] = []
    if not facts.guards:
        gaps.append("Input/output guards (prompt injection, PII, secrets) are not implemented.")
    if not facts.anomaly_detection:
        gaps.append("Anomaly detection (Isolation Forest with SHAP reasons) is not implemented.")
    if facts.retention_days < MIN_RETENTION_DAYS:
        gaps.append(f"Log retention is below {MIN_RETENTION_DAYS} days.")
    if facts.audit_enabled and facts.retention_interval_s <= 0:
        gaps.append("Retention is not scheduled: run `bastion audit retention` regularly.")
    if not facts.watermark_enabled:
        gaps.append("Watermarking of generated text is off.")
    if not facts.audit_enabled:
        gaps.append("The audit log is off.")
    if not facts.auth_enabled:
        gaps.append("Authentication is off (dev setup).")
    if not facts.tls:
        gaps.append("The listener does not terminate TLS itself (check the proxy in front).")
    if not facts.events_shipped:
        gaps.append("Events are not shipped to Elasticsearch.")
    elif facts.events_status != "delivering":
        gaps.append(f"Event shipping is {facts.events_status}: the cluster is not taking events.")
    gaps.append("Accuracy is measured only as error rates: no task-quality evaluation.")
    return gaps


def as_json(figures: Figures) -> dict[str, Any]:
    """The figures as JSON-ready values (for tests and API clients)."""
    return {
        "days": figures.days,
        "requests": figures.requests,
        "statuses": figures.statuses,
        "watermark": figures.watermark,
        "actions": figures.actions,
    }
