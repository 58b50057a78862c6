"""The one abstraction of the guards: a scanner takes text and context, returns a verdict.

A pipeline (gateway.guards.pipeline) is a configured list of scanners; rule scanners,
the shipped injection classifier and llm-guard adapters all implement :class:`Scanner`,
so swapping one for another (gorget, an operator's own model) is configuration.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Literal, Protocol

Action = Literal["block", "redact", "flag"]
"""What a policy does with a finding: refuse the call (400, nothing forwarded), forward
the cleaned text, or forward unchanged and record."""


@dataclass(slots=True, frozen=True)
class Span:
    start: int
    end: int
    label: str
    """What was found there (``EMAIL``, ``aws_access_key``, ``tag_characters``...)."""


@dataclass(slots=True)
class Finding:
    """Something a scanner found: how sure it is, where, and what it suggests."""

    score: float
    """0..1; the policy's threshold decides whether it counts."""
    spans: list[Span] = field(default_factory=list)
    suggested: Action = "block"
    detail: str = ""
    """A short, safe description (never the matched text itself)."""
    redacted: str | None = None
    """The text with the spans cleaned, when the scanner can redact."""


@dataclass(slots=True, frozen=True)
class ScanContext:
    """What a scanner may know about the request besides the text."""

    stage: Literal["input", "output"]
    role: str | None = None
    """The message's role (system, user, assistant, tool), or None for plain prompts."""
    key_id: str | None = None
    roles: tuple[str, ...] = ()
    model: str | None = None
    wants_json: bool = False
    """The caller asked for a JSON answer (response_format)."""
    known_values: Container[str] = frozenset()
    """Values the caller itself sent (its PII vault's): an output scanner does not report
    them as leaks."""
    final: bool = True
    """The text is complete; False for a window of a stream still arriving (a scanner that
    needs the whole text, such as JSON validity, waits for the final one)."""


class Scanner(Protocol):
    """Scans one text; returns None when it passes, a Finding when it does not."""

    name: str

    def scan(self, text: str, context: ScanContext) -> Finding | None: ...


# Optional attributes a scanner may declare (read with getattr; absent means False):
#   heavy: runs a model; the pipeline runs it in its worker pool with a timeout.
#   whole_request: scans all of a request's texts joined (token limit), not each text.
#   default_threshold: the score at which a finding counts when the policy sets none.
