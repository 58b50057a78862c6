"""Scanners of answers only: ``refusal`` (the model declined) and ``json_validity``.

Refusals are found by phrases models use to decline, near the start of an answer (a
refusal quoted later in a long answer is not one). JSON validity applies only when the
caller asked for JSON (``response_format`` ``json_object`` or ``json_schema``) and only to
the whole answer (a stream's final text), never to a window of it.
"""

from __future__ import annotations

import re

import orjson

from gateway.guards.scanner import Finding, ScanContext, Span

_REFUSAL = re.compile(
    r"(?i)\b(?:i'?m (?:sorry|afraid)[,.]? (?:but )?i (?:can(?:no|')t|cannot|won'?t|am unable)"
    r"|i (?:can(?:no|')t|cannot|won'?t|am unable to|'m unable to|must decline to|am not able to)"
    r" (?:help|assist|comply|provide|fulfil+|do that|support|answer|create|generate|share)"
    r"|i must (?:respectfully )?decline|as an ai(?: language model)?,? i (?:can(?:no|')t|cannot|"
    r"don'?t|am not able)"
    r"|i'?m (?:unable|not able) to (?:help|assist|provide|comply|share|answer|do that)"
    r"|(?:this|that|your) request (?:violates|goes against|is against)"
    r"|i (?:can(?:no|')t|won'?t) (?:engage|participate) in)"
)
_REFUSAL_WORDS = (
    "sorry",
    "afraid",
    "can't",
    "can\u2019t",
    "cannot",
    "won't",
    "won\u2019t",
    "unable",
    "decline",
    "not able",
    "request",
    "as an ai",
)
REFUSAL_WINDOW = 400
"""Characters from the start of an answer in which a refusal phrase counts."""


class RefusalScanner:
    name = "refusal"

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        head = text[:REFUSAL_WINDOW].lower()
        if not any(word in head for word in _REFUSAL_WORDS):
            return None  # the usual case, at the cost of a few substring tests
        match = _REFUSAL.search(head.replace("\u2019", "'"))
        if match is None:
            return None
        return Finding(
            score=0.9,
            spans=[Span(match.start(), match.end(), "refusal")],
            suggested="flag",
            detail="the model declined",
        )


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n([\s\S]*?)\n?```\s*$")


class JSONValidityScanner:
    """Scans an answer's content (role ``assistant``), not its reasoning or tool calls."""

    name = "json_validity"
    whole_answer = True

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        if not context.wants_json or not context.final or context.role not in (None, "assistant"):
            return None
        try:
            orjson.loads(text)
            return None
        except orjson.JSONDecodeError:
            pass
        fenced = _FENCE.match(text)
        detail = "the answer is JSON inside a code fence" if fenced else "the answer is not JSON"
        return Finding(score=0.6 if fenced else 1.0, suggested="flag", detail=detail)
