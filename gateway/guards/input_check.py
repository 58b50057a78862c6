"""The input guards as a request check: scan a model call's texts before it is forwarded.

``InputGuard.check(call)`` runs the caller's input pipeline (policies per role and key)
over the body's texts, records one verdict per scanner in ``call.event.guard_verdicts``,
refuses the call on a block (400 ``guard_blocked``) or a scanner failing closed (503
``guard_unavailable``), forwards redacted texts through ``call.change``, leaves the call's
PII vault in ``call.state["guards.vault"]`` for the output guard, and adds the
``x-bastion-guard`` header (``pass``, or ``redact=pii;flag=prompt_injection``).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.guards.body_texts import body_texts, changed_fields
from gateway.guards.errors import UnscannablePrompt
from gateway.guards.factory import build_default_input_scanners
from gateway.guards.pipeline import GuardPipeline, Step
from gateway.guards.scanner import ScanContext, Scanner
from gateway.guards.settings import FailureMode, GuardSettings
from gateway.guards.vault import PIIVault, VaultStore
from gateway.pipeline import CallContext
from monitors.request_event import GuardVerdict

VAULT = "guards.vault"
DETAILS = "guards.details"
HEADER = b"x-bastion-guard"


class InputGuard:
    """A :class:`gateway.pipeline.RequestCheck`; one per gateway process."""

    def __init__(
        self,
        settings: GuardSettings,
        tokenizers: Mapping[str, Path] | None = None,
        *,
        scanners: Mapping[str, Scanner] | None = None,
    ) -> None:
        """``tokenizers``: model -> directory with ``tokenizer.json`` (or the file), for
        counting prompt tokens exactly; ``scanners`` replaces the defaults (tests, or an
        operator's own scanner under a configured name)."""
        self.settings = settings
        self.scanners = (
            dict(scanners)
            if scanners is not None
            else (build_default_input_scanners(settings, tokenizers))
        )
        models = settings.model_scanners
        self._executor = ThreadPoolExecutor(models.workers, thread_name_prefix="bastion-guard")
        self._pipelines: dict[tuple[object, ...], GuardPipeline] = {}
        self._vaults = (
            VaultStore(settings.pii.conversation_ttl_s, settings.pii.max_conversations)
            if settings.pii.vault == "conversation"
            else None
        )
        self._conversation_header = settings.pii.conversation_header.lower().encode()

    def pipeline(self, roles: tuple[str, ...], key_id: str | None) -> GuardPipeline:
        """The input pipeline of a caller (resolved once per distinct policy)."""
        cache_key = self.settings.override_key(roles, key_id)
        found = self._pipelines.get(cache_key)
        if found is None:
            policies = self.settings.policies("input", roles, key_id)
            steps = [
                Step(self.scanners[name], policy, policy.on_error or self._on_error)
                for name, policy in policies.items()
                if name in self.scanners
            ]
            found = GuardPipeline(
                "input",
                steps,
                executor=self._executor,
                timeout_s=self.settings.model_scanners.timeout_s,
            )
            self._pipelines[cache_key] = found
        return found

    @property
    def _on_error(self) -> FailureMode:
        return self.settings.model_scanners.on_error

    async def check(self, call: CallContext) -> None:
        if not self.settings.enabled:
            return
        roles = tuple(sorted(call.principal.roles))
        key_id = call.principal.key_id
        texts, unscannable = body_texts(call.body)
        if unscannable:
            if self.settings.token_prompts == "block":
                raise UnscannablePrompt(
                    "Prompts given as token ids cannot be checked by the guards; send text."
                )
            call.event.guard_verdicts.append(GuardVerdict("unscannable", "input", "flag", 1.0))
        vault = self._vault(call, key_id)
        for item in texts:
            vault.reserve_literals(item.text)
        model = call.body.get("model")
        context = ScanContext(
            stage="input",
            key_id=key_id,
            roles=roles,
            model=model if isinstance(model, str) else None,
        )
        report = await self.pipeline(roles, key_id).scan(texts, context, vault)
        call.event.guard_verdicts.extend(report.verdicts)
        call.state[VAULT] = vault
        call.state[DETAILS] = dict(report.details)
        report.raise_for("input")
        for name, value in changed_fields(call.body, texts).items():
            call.change(name, value)
        summary = report.summary()
        if any(v.scanner == "unscannable" for v in call.event.guard_verdicts):
            summary = "flag=unscannable" if summary == "pass" else summary + ";flag=unscannable"
        call.add_header(HEADER, summary.encode())

    def _vault(self, call: CallContext, key_id: str) -> PIIVault:
        if self._vaults is not None:
            for name, value in call.scope.get("headers", ()):
                if name == self._conversation_header and value:
                    conversation = value.decode("latin-1")[:256]
                    return self._vaults.get(key_id, conversation)
        return PIIVault()

    def close(self) -> None:
        """Stop the worker pool (at shutdown)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
