"""The default scanners of each stage, built once from the settings.

Scanners are stateless and shared by every call; what differs per caller is the policy
(gateway.guards.settings), applied when a pipeline is resolved for a caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.guards.answer_scanners import JSONValidityScanner, RefusalScanner
from gateway.guards.invisible import InvisibleTextScanner
from gateway.guards.pii import PIILeakScanner, PIIScanner
from gateway.guards.scanner import Finding, ScanContext, Scanner
from gateway.guards.secrets import SecretsScanner
from gateway.guards.settings import GuardSettings
from gateway.guards.sql_injection import SQLInjectionScanner
from gateway.guards.token_limit import TokenLimitScanner, load_tokenizers


class ScoredClassifier:
    """The injection classifier reporting its score for every text, so the policy's
    threshold (per role, per key) decides, with the model's own as the default."""

    name = "prompt_injection"

    def __init__(self, classifier: Any) -> None:
        self._classifier = classifier
        self.default_threshold = float(classifier.threshold)
        self.heavy = bool(getattr(classifier, "heavy", False))

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        score = float(self._classifier.score(text))
        return Finding(score=score, suggested="block", detail="injection or jailbreak pattern")


def injection_classifier() -> Scanner:
    """The shipped classifier (gateway.guards.classifier), loaded and hash-checked."""
    from gateway.guards.classifier import InjectionClassifier

    return ScoredClassifier(InjectionClassifier())


def build_default_input_scanners(
    settings: GuardSettings, tokenizers: Mapping[str, Path] | None = None
) -> dict[str, Scanner]:
    """Scanner name -> scanner, for every input scanner the settings enable anywhere."""
    scanners: dict[str, Scanner] = {
        "invisible_text": InvisibleTextScanner(),
        "secrets": SecretsScanner(),
        "sql_injection": SQLInjectionScanner(),
        "pii": PIIScanner(settings.pii.entities),
        "token_limit": TokenLimitScanner(
            settings.token_limit.max_tokens, load_tokenizers(tokenizers or {})
        ),
    }
    models = operator_models(settings, "input")
    if "prompt_injection" in models:
        scanners["prompt_injection"] = models.pop("prompt_injection")
    elif _wanted(settings, "input", "prompt_injection"):
        # A missing or altered artefact stops the start (ArtefactMismatch): a gateway
        # must not come up without the guard its configuration asks for.
        scanners["prompt_injection"] = injection_classifier()
    scanners.update(models)
    return scanners


def build_default_output_scanners(settings: GuardSettings) -> dict[str, Scanner]:
    return {
        "secrets": SecretsScanner(),
        "pii_leak": PIILeakScanner(settings.pii.entities),
        "refusal": RefusalScanner(),
        "json_validity": JSONValidityScanner(),
        **operator_models(settings, "output"),
    }


def operator_models(settings: GuardSettings, stage: str) -> dict[str, Scanner]:
    """The operator's ONNX models of ``stage`` (``guards.models``), loaded from disk."""
    if not any(stage in model.stages for model in settings.models.values()):
        return {}
    from gateway.guards.model_scanner import ONNXClassifierScanner  # onnxruntime: only if used

    return {
        name: ONNXClassifierScanner(name, model)
        for name, model in settings.models.items()
        if stage in model.stages
    }


def _wanted(settings: GuardSettings, stage: str, name: str) -> bool:
    """Whether any policy (base, a role's, a key's) enables the scanner."""
    base = settings.input if stage == "input" else settings.output
    if base[name].enabled:
        return True
    for override in (*settings.roles.values(), *settings.keys.values()):
        change = getattr(override, stage).get(name)
        if change is not None and change.enabled:
            return True
    return False
