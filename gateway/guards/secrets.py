"""Scanner ``secrets``: credentials in a prompt or an answer, found in memory.

llm-guard's Secrets writes each prompt to a temporary file for detect-secrets to read;
this scanner never touches the disk. High-precision patterns for the formats providers
document (AWS, GCP, Azure, GitHub, GitLab, Slack, Stripe, OpenAI, Anthropic, Hugging Face,
npm, private keys, JWTs, credentials in URLs) score 1.0; a ``password = ...`` style
assignment scores by the value's entropy, so ``password = "********"`` or
``api_key = <your key>`` pass. A cheap prefilter skips the regular expressions for text
with none of the tell-tale fragments. Redaction writes ``[REDACTED_SECRET]``.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from gateway.guards.scanner import Finding, ScanContext, Span

REDACTED = "[REDACTED_SECRET]"

_PATTERNS: tuple[tuple[str, str], ...] = (
    ("aws_access_key_id", r"\b(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[0-9A-Z]{16}\b"),
    (
        "aws_secret_access_key",
        r"(?i:aws.{0,20}?(?:secret|private).{0,20}?)['\"]?\s*[:=]\s*['\"]?"
        r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
    ),
    ("gcp_api_key", r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"),
    ("gcp_oauth_secret", r"\bGOCSPX-[0-9A-Za-z_\-]{28}(?![0-9A-Za-z_\-])"),
    ("azure_storage_key", r"(?i:AccountKey)=([A-Za-z0-9+/]{86}==)"),
    ("azure_sas_signature", r"[?&]sig=([A-Za-z0-9%+/]{40,}(?:%3D|=){0,2})"),
    ("azure_client_secret", r"(?<![\w~.\-])[A-Za-z0-9_~.\-]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}\b"),
    ("github_token", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b"),
    ("github_pat", r"\bgithub_pat_[A-Za-z0-9_]{82}\b"),
    ("gitlab_token", r"\bglpat-[A-Za-z0-9_\-]{20}\b"),
    ("slack_token", r"\bxox[abposr]-(?:[0-9A-Za-z]+-){1,4}[0-9A-Za-z]{8,}\b"),
    (
        "slack_webhook",
        r"https://hooks\.slack\.com/(?:services|workflows)/T[A-Z0-9]+/[A-Z0-9]+/[A-Za-z0-9]{16,}",
    ),
    ("stripe_key", r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,99}\b"),
    ("anthropic_key", r"\bsk-ant-(?:api|admin)\d\d-[A-Za-z0-9_\-]{80,}"),
    (
        "openai_key",
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,}",
    ),
    ("openai_key", r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}"),
    ("huggingface_token", r"\bhf_[A-Za-z]{34}\b"),
    ("npm_token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    ("sendgrid_key", r"\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}\b"),
    ("twilio_key", r"\bSK[0-9a-f]{32}\b"),
    (
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )?PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )?PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s\\n]*)",
    ),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,}"),
    (
        "url_credentials",
        r"\b[a-z][a-z0-9+.\-]{1,20}://[^\s:/@\"'<>]{1,64}:([^\s@/\"'<>]{3,128})@[\w.\-]+",
    ),
)
_FIXED = [(label, re.compile(pattern)) for label, pattern in _PATTERNS]

# Any of these fragments must occur for one of the fixed patterns to match (substring
# tests run at C speed; one alternation of them as a regular expression cost 20x more).
_FRAGMENTS = (
    "AKIA", "ASIA", "ABIA", "ACCA", "AROA", "AIDA", "AIza", "GOCSPX", "sig=", "Q~", "ghp_",
    "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xox", "hooks.slack", "_live_",
    "_test_", "sk-", "hf_", "npm_", "SG.", "SK", "PRIVATE KEY", "eyJ", "://",
)  # fmt: skip
_LOWER_FRAGMENTS = ("aws", "accountkey")
_ASSIGNMENT_WORDS = ("pass", "pwd", "secret", "key", "token", "bearer")

_ASSIGNMENT = re.compile(
    r"(?i)\b(?:password|passwd|passphrase|pwd|secret|secret[_-]?key|api[_-]?key|apikey"
    r"|access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|private[_-]?key"
    r"|bearer|token)\b[\"']?\s*(?:[:=]|=>|:=|\s+is\s+)\s*"
    r"(?:\"([^\"\s]{6,200})\"|'([^'\s]{6,200})'|([^\s\"',;)}\]]{6,200}))"
)
_BEARER = re.compile(r"(?i)\bauthorization:\s*(?:bearer|basic)\s+([A-Za-z0-9._~+/=\-]{16,})")
_PLACEHOLDER = re.compile(
    r"(?i)^(?:\*+|x+|\.+|<.*>|\$\{.*\}|\$\w+|\{\{.*\}\}|%\w+%|os\.environ.*|getenv.*|env\..*"
    r"|process\.env.*|.*(?:your|example|sample|dummy|placeholder|changeme|redacted|xxxx).*"
    r"|none|null|true|false|undefined|required|optional|string|str|input|self\..*)$"
)


# snake_case, dotted.names and camelCase: code assigning a variable, not a literal.
_IDENTIFIER = re.compile(
    r"[a-z_][a-z0-9]*(?:[._][a-z_][a-z0-9_]*)+|[a-z]+(?:[A-Z][a-z0-9]+)+|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"
)


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _assignment_score(value: str) -> float:
    if _PLACEHOLDER.match(value) or len(set(value)) < 4:
        return 0.0
    if "(" in value or value.endswith(("_", ".")) or _IDENTIFIER.fullmatch(value):
        return 0.0  # a call or a variable being assigned, not a literal
    h = entropy(value)
    mixed = sum(
        (
            any(c.islower() for c in value),
            any(c.isupper() for c in value),
            any(c.isdigit() for c in value),
        )
    )
    if h >= 3.5 and len(value) >= 16:
        return 0.95
    if h >= 2.5 and (mixed >= 2 or not value.isalpha()):
        return 0.8
    return 0.4  # a dictionary word is weak evidence: below the default threshold


class SecretsScanner:
    """Finds credentials (see the module docstring); spans are labelled by kind."""

    name = "secrets"

    def replacement(self, span: Span) -> str:
        return REDACTED

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        spans: list[Span] = []
        score = 0.0
        low = text.lower()
        if any(f in text for f in _FRAGMENTS) or any(f in low for f in _LOWER_FRAGMENTS):
            for label, pattern in _FIXED:
                for match in pattern.finditer(text):
                    group = 1 if pattern.groups and match.group(1) else 0
                    spans.append(Span(match.start(group), match.end(group), label))
                    score = 1.0
        assigned = any(word in low for word in _ASSIGNMENT_WORDS)
        for match in _ASSIGNMENT.finditer(text) if assigned else ():
            group = next(i for i in (1, 2, 3) if match.group(i) is not None)
            value = match.group(group)
            value_score = _assignment_score(value)
            if value_score >= 0.5:
                spans.append(Span(match.start(group), match.end(group), "password_assignment"))
                score = max(score, value_score)
        for match in _BEARER.finditer(text) if "authorization" in low else ():
            spans.append(Span(match.start(1), match.end(1), "authorization_header"))
            score = max(score, 0.95)
        if not spans:
            return None
        spans = _disjoint(spans)
        return Finding(
            score=score,
            spans=spans,
            suggested="redact",
            detail="credentials: " + ", ".join(sorted({s.label for s in spans})),
            redacted=replace_spans(text, spans, lambda span: REDACTED),
        )


def _disjoint(spans: list[Span]) -> list[Span]:
    """Sorted, overlapping spans merged (the first label wins)."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if out and span.start < out[-1].end:
            last = out[-1]
            out[-1] = Span(last.start, max(last.end, span.end), last.label)
        else:
            out.append(span)
    return out


def replace_spans(text: str, spans: list[Span], replacement: object) -> str:
    """``text`` with each of the sorted, disjoint ``spans`` replaced by ``replacement(span)``."""
    parts: list[str] = []
    last = 0
    for span in spans:
        parts.append(text[last : span.start])
        parts.append(replacement(span))  # type: ignore[operator]
        last = span.end
    parts.append(text[last:])
    return "".join(parts)
