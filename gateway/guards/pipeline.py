"""A guard pipeline: a configured list of scanners run over texts, and their verdicts.

Each step is a scanner with its policy (action, threshold, message roles, failure mode).
Steps run in order, each over every text it applies to, so a later step sees what an
earlier one redacted (hidden characters stripped before the classifier reads the text).
Rule scanners run inline (microseconds to a millisecond); scanners that declare
``heavy = True`` (a model) run in the pipeline's worker pool under a timeout, so the
event loop never waits on them. One :class:`~monitors.request_event.GuardVerdict` per
step: the worst action taken over its texts, the highest score, the time it took.

A scanner that raises or times out is recorded as ``error``; its policy then either lets
the call pass (``fail_open``) or refuses it with a 503 (``fail_closed``): never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Literal

from gateway.guards.body_texts import BodyText
from gateway.guards.errors import AnswerBlocked, GuardBlocked, GuardUnavailable
from gateway.guards.scanner import Finding, ScanContext, Scanner, Span
from gateway.guards.secrets import replace_spans
from gateway.guards.settings import FailureMode, ScannerPolicy
from gateway.guards.vault import PIIVault
from monitors.request_event import GuardAction, GuardVerdict

__all__ = ["AnswerBlocked", "GuardBlocked", "GuardPipeline", "GuardUnavailable", "Step"]

log = logging.getLogger("bastion.guards")
Stage = Literal["input", "output"]
DEFAULT_THRESHOLD = 0.5

Redaction = tuple[BodyText, Span, str]
"""A span of one scanned text and what replaces it."""


@dataclass(slots=True, frozen=True)
class Step:
    """One scanner of a pipeline and its effective policy."""

    scanner: Scanner
    policy: ScannerPolicy
    on_error: FailureMode

    @property
    def name(self) -> str:
        return self.scanner.name

    threshold: float = field(init=False)
    """The policy's threshold, else the scanner's own default (worked out once)."""

    def __post_init__(self) -> None:
        threshold = self.policy.threshold
        if threshold is None:
            threshold = float(getattr(self.scanner, "default_threshold", DEFAULT_THRESHOLD))
        object.__setattr__(self, "threshold", threshold)

    def applies_to(self, role: str) -> bool:
        roles = self.policy.message_roles
        return roles is None or role in roles


@dataclass(slots=True)
class ScanReport:
    """What one run of a pipeline decided."""

    verdicts: list[GuardVerdict] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    """Scanner -> its finding's safe description (never the matched text)."""
    blocked: str | None = None
    """The first scanner whose policy blocked, if any."""
    failed: str | None = None
    """The first scanner that failed closed, if any."""

    def actions(self) -> dict[str, list[str]]:
        """Action -> the scanners that took it (pass and error left out)."""
        taken: dict[str, list[str]] = {}
        for verdict in self.verdicts:
            if verdict.action in ("block", "redact", "flag"):
                taken.setdefault(verdict.action, []).append(verdict.scanner)
        return taken

    def summary(self) -> str:
        """The ``x-bastion-guard`` value: ``pass``, or ``redact=pii,secrets;flag=...``."""
        taken = self.actions()
        if not taken:
            return "pass"
        order = ("block", "redact", "flag")
        return ";".join(f"{a}={','.join(taken[a])}" for a in order if a in taken)

    def raise_for(self, stage: Stage) -> None:
        """Raise the refusal this report calls for, if any."""
        if self.failed is not None:
            raise GuardUnavailable(self.failed)
        if self.blocked is not None:
            raise GuardBlocked(self.blocked) if stage == "input" else AnswerBlocked(self.blocked)


class GuardPipeline:
    """Runs its steps over texts; see the module docstring."""

    def __init__(
        self,
        stage: Stage,
        steps: Sequence[Step],
        *,
        executor: Executor | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self.stage = stage
        self.steps = [s for s in steps if s.policy.enabled]
        self._executor = executor
        self._timeout = timeout_s

    @property
    def empty(self) -> bool:
        return not self.steps

    async def scan(
        self,
        texts: Sequence[BodyText],
        context: ScanContext,
        vault: PIIVault | None = None,
        *,
        spans: list[Redaction] | None = None,
    ) -> ScanReport:
        """Scan ``texts``; stop at the first block or closed failure.

        Redactions change the texts in place, or, given a ``spans`` list, are appended to
        it instead (texts untouched: a stream applies them where it releases text)."""
        report = ScanReport()
        for step in self.steps:
            started = time.perf_counter()
            try:
                if getattr(step.scanner, "heavy", False):
                    outcome = await self._in_pool(step, texts, context, vault, spans)
                else:
                    outcome = _run_step(step, texts, context, vault, spans)
            except Exception as exc:  # a broken scanner must not become a 500
                latency = time.perf_counter() - started
                kind = "timed out" if isinstance(exc, TimeoutError) else "failed"
                log.warning(
                    "guard %s %s (%s): %s", step.name, kind, step.on_error, type(exc).__name__
                )
                report.verdicts.append(GuardVerdict(step.name, self.stage, "error", 0.0, latency))
                report.details[step.name] = f"scanner {kind}"
                if step.on_error == "fail_closed":
                    report.failed = step.name
                    return report
                continue
            action, score, detail = outcome
            latency = time.perf_counter() - started
            report.verdicts.append(GuardVerdict(step.name, self.stage, action, score, latency))
            if detail:
                report.details[step.name] = detail
            if action == "block":
                report.blocked = step.name
                return report
        return report

    async def _in_pool(
        self,
        step: Step,
        texts: Sequence[BodyText],
        context: ScanContext,
        vault: PIIVault | None,
        spans: list[Redaction] | None,
    ) -> tuple[GuardAction, float, str]:
        # Scan copies in the worker: a scanner still running after its timeout must not
        # change texts the call has moved on with.
        copies = [BodyText(t.path, t.text, t.role, t.json_string) for t in texts]
        loop = asyncio.get_running_loop()
        found: list[Redaction] | None = None if spans is None else []
        future = loop.run_in_executor(
            self._executor, _run_step, step, copies, context, vault, found
        )
        outcome = await asyncio.wait_for(future, self._timeout)
        if spans is not None and found:
            spans.extend(found)
        for original, scanned in zip(texts, copies, strict=True):
            if scanned.changed:
                original.text, original.changed = scanned.text, True
        return outcome


def _run_step(
    step: Step,
    texts: Sequence[BodyText],
    context: ScanContext,
    vault: PIIVault | None,
    spans: list[Redaction] | None = None,
) -> tuple[GuardAction, float, str]:
    """(the action taken, the highest score, a safe detail) of one step over the texts."""
    scanner, policy = step.scanner, step.policy
    threshold = step.threshold
    targets = [t for t in texts if step.applies_to(t.role)]
    if not targets:
        return "pass", 0.0, ""
    if getattr(scanner, "whole_request", False):
        joined = "\n".join(t.text for t in targets)
        finding = scanner.scan(joined, _context(context, None))
        if finding is None or finding.score < threshold:
            return "pass", finding.score if finding else 0.0, ""
        # A whole-request finding has nothing to redact: redact acts as block.
        action: GuardAction = "flag" if policy.action == "flag" else "block"
        return action, finding.score, finding.detail
    best = 0.0
    detail = ""
    counted = False
    for item in targets:
        finding = scanner.scan(item.text, _context(context, item.role))
        if finding is None:
            continue
        best = max(best, finding.score)
        if finding.score < threshold:
            continue
        counted = True
        detail = detail or finding.detail
        if policy.action == "block":
            return "block", best, detail
        if policy.action == "redact" and spans is not None:
            if not finding.spans:
                return "block", best, detail + " (cannot be redacted)"
            spans.extend((item, span, _replacement(scanner, span)) for span in finding.spans)
        elif policy.action == "redact":
            cleaned = _redacted(scanner, item.text, finding, vault)
            if cleaned is None:
                return "block", best, detail + " (cannot be redacted)"
            item.text, item.changed = cleaned, True
    if not counted:
        return "pass", best, ""
    return policy.action, best, detail


def _replacement(scanner: Scanner, span: Span) -> str:
    replacement = getattr(scanner, "replacement", None)
    if replacement is not None:
        return str(replacement(span))
    return f"[REDACTED_{span.label.upper()}]"


def _context(context: ScanContext, role: str | None) -> ScanContext:
    if role == context.role:
        return context
    return ScanContext(
        stage=context.stage,
        role=role,
        key_id=context.key_id,
        roles=context.roles,
        model=context.model,
        wants_json=context.wants_json,
        known_values=context.known_values,
        final=context.final,
    )


def _redacted(scanner: Scanner, text: str, finding: Finding, vault: PIIVault | None) -> str | None:
    """The text cleaned of the finding: into the vault, by the scanner, or span by span."""
    redact_into = getattr(scanner, "redact_into", None)
    if redact_into is not None and vault is not None:
        return str(redact_into(text, finding, vault))
    if finding.redacted is not None:
        return finding.redacted
    if finding.spans:
        spans = _disjoint(finding.spans)
        return replace_spans(text, spans, lambda span: _replacement(scanner, span))
    return None


def _disjoint(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: s.start):
        if out and span.start < out[-1].end:
            last = out[-1]
            out[-1] = Span(last.start, max(last.end, span.end), last.label)
        else:
            out.append(span)
    return out
