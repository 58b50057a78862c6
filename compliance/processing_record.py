"""What Bastion processes, why, for whom and how long: Art. 30 and Art. 15 information.

Built from plain facts the gateway reads from its live configuration
(:class:`ProcessingFacts`), so the record cannot drift from what is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PURPOSES = [
    "Serving requests to self-hosted language models on behalf of the caller",
    "Security: authentication, access control, rate limiting, abuse and anomaly detection",
    "Accountability: a tamper-evident audit log of requests and administrative actions",
]
SUBJECT_CATEGORIES = [
    "Users of applications that call the gateway (identified by the API key's subject)",
    "Operators, administrators and compliance officers holding API keys",
]
DATA_CATEGORIES = {
    "identifiers": "subject id, API key id, request id, client address",
    "content": "prompts and model outputs (encrypted in the audit log)",
    "usage": "times, models, token counts, latencies, status, guard and watermark verdicts",
    "profile": "display name, email and other attributes given for the subject",
    "privacy_flags": "restriction, do-not-sell/share, legal hold",
}
SOURCE = (
    "Collected from the data subject, or from the application acting for them, when it "
    "calls the gateway; profile data from the subject or the controller."
)
AUTOMATED_DECISIONS = (
    "No decisions with legal or similarly significant effect are taken automatically. "
    "Automated security checks (input/output guards, rate limits, anomaly detection) may "
    "refuse or flag a single request."
)


@dataclass(frozen=True, slots=True)
class ProcessingFacts:
    """The configuration as far as data protection is concerned."""

    controller: dict[str, Any]
    recipients: list[dict[str, Any]]
    """The upstream inference servers (name, url, models): internal recipients."""
    retention_days: int
    payloads_kept: bool
    tls: bool
    mutual_tls: bool
    authentication: bool
    rate_limits: bool
    audit_log: bool
    extra_measures: list[str] = field(default_factory=list)


def retention_text(facts: ProcessingFacts) -> str:
    return (
        f"Audit entries (metadata and encrypted content) are kept {facts.retention_days} days, "
        "then deleted; content becomes unreadable at once when the subject is erased. "
        "Profile data and flags are kept until erasure; erasure receipts and the request "
        "ledger (pseudonymised) are kept as proof of compliance."
    )


def security_measures(facts: ProcessingFacts) -> dict[str, Any]:
    return {
        "tls_in_transit": facts.tls,
        "mutual_tls": facts.mutual_tls,
        "encryption_at_rest_of_payloads": facts.audit_log and facts.payloads_kept,
        "encryption_scheme": "AES-256-GCM per-subject data keys wrapped by a master key",
        "tamper_evident_log": facts.audit_log,
        "signing": "Ed25519 signed checkpoints over SHA-256 hash chains",
        "access_control": {
            "authentication": "API keys (HMAC-peppered hashes)" if facts.authentication else None,
            "rbac": "roles admin, model_admin, data_scientist, app, auditor",
        },
        "rate_limits": facts.rate_limits,
        "crypto_shredding_on_erasure": True,
        "other": facts.extra_measures,
    }


def processing_record(facts: ProcessingFacts) -> dict[str, Any]:
    """The Art. 30(1) record of processing activities, as JSON-ready values."""
    return {
        "record": "GDPR Art. 30(1) record of processing activities",
        "controller": facts.controller,
        "purposes": PURPOSES,
        "categories_of_data_subjects": SUBJECT_CATEGORIES,
        "categories_of_personal_data": DATA_CATEGORIES,
        "recipients": facts.recipients,
        "third_country_transfers": "none: every recipient is under the controller's control",
        "retention": {"audit_days": facts.retention_days, "text": retention_text(facts)},
        "security_measures": security_measures(facts),
    }


def subject_information(facts: ProcessingFacts) -> dict[str, Any]:
    """Art. 15(1)(a)-(h) and 15(2) information given with every access request."""
    return {
        "purposes": PURPOSES,
        "categories_of_personal_data": DATA_CATEGORIES,
        "recipients": facts.recipients,
        "retention": {"audit_days": facts.retention_days, "text": retention_text(facts)},
        "rights": [
            "rectification (Art. 16): PATCH /privacy/subjects/{id}",
            "erasure (Art. 17): DELETE /privacy/subjects/{id}",
            "restriction (Art. 18): POST /privacy/subjects/{id}/restrict",
            "portability (Art. 20): this document",
            "do-not-sell/share (CCPA): PUT /privacy/subjects/{id}/do-not-sell",
            "complaint to a supervisory authority (Art. 77)",
        ],
        "source": SOURCE,
        "automated_decision_making": AUTOMATED_DECISIONS,
        "third_country_transfers": "none",
        "controller": facts.controller,
    }
