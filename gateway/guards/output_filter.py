"""The output guards as an answer filter: scan what the model wrote before the client sees it.

:class:`OutputGuard` is the :class:`gateway.pipeline.AnswerFilterSource`; per call it
makes a :class:`WholeAnswerGuard` (a JSON answer) or a
:class:`~gateway.guards.stream_guard.StreamGuard` (an SSE stream), or None for
embeddings and when the caller's policy runs no output scanner and nothing needs restoring.

A whole answer: every choice's texts (content, reasoning, tool-call arguments, completions
text) are scanned; a block refuses the answer with 422 ``output_guard_blocked``
(:class:`~gateway.guards.errors.AnswerBlocked`), redactions are applied, the caller's
placeholders restored from its vault, and ``x-bastion-guard-output`` says what was done.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from gateway.guards.body_texts import BodyText
from gateway.guards.factory import build_default_output_scanners
from gateway.guards.input_check import VAULT
from gateway.guards.pipeline import GuardPipeline, ScanReport, Step
from gateway.guards.scanner import ScanContext, Scanner
from gateway.guards.settings import GuardSettings
from gateway.guards.stream_guard import OUTPUT_STATE, StreamGuard
from gateway.guards.vault import PIIVault
from gateway.pipeline import AnswerFilter, CallContext

OUTPUT_HEADER = b"x-bastion-guard-output"
_TEXT_FIELDS = {"content": "assistant", "reasoning_content": "reasoning", "reasoning": "reasoning"}


class OutputGuard:
    """Makes the output guard of each call; one per gateway process."""

    def __init__(
        self, settings: GuardSettings, *, scanners: dict[str, Scanner] | None = None
    ) -> None:
        self.settings = settings
        self.scanners = (
            scanners if scanners is not None else build_default_output_scanners(settings)
        )
        self._pipelines: dict[tuple[object, ...], tuple[GuardPipeline, GuardPipeline]] = {}
        self._executor = ThreadPoolExecutor(
            settings.model_scanners.workers, thread_name_prefix="bastion-guard-out"
        )

    def pipelines(
        self, roles: tuple[str, ...], key_id: str | None
    ) -> tuple[GuardPipeline, GuardPipeline]:
        """(the window scanners, the whole-answer-only scanners) of a caller."""
        cache_key = self.settings.override_key(roles, key_id)
        found = self._pipelines.get(cache_key)
        if found is None:
            on_error = self.settings.model_scanners.on_error
            steps = [
                Step(self.scanners[name], policy, policy.on_error or on_error)
                for name, policy in self.settings.policies("output", roles, key_id).items()
                if name in self.scanners
            ]
            timeout = self.settings.model_scanners.timeout_s
            window = [s for s in steps if not getattr(s.scanner, "whole_answer", False)]
            whole = [s for s in steps if getattr(s.scanner, "whole_answer", False)]
            found = (
                GuardPipeline("output", window, executor=self._executor, timeout_s=timeout),
                GuardPipeline("output", whole, executor=self._executor, timeout_s=timeout),
            )
            self._pipelines[cache_key] = found
        return found

    def for_call(self, call: CallContext) -> AnswerFilter | None:
        if not self.settings.enabled or call.route.endswith("/embeddings"):
            return None
        roles = tuple(sorted(call.principal.roles))
        window, whole = self.pipelines(roles, call.principal.key_id)
        vault = call.state.get(VAULT)
        if not isinstance(vault, PIIVault):
            vault = PIIVault()
        if window.empty and whole.empty and not len(vault):
            return None
        model = call.body.get("model")
        context = ScanContext(
            stage="output",
            role="assistant",
            key_id=call.principal.key_id,
            roles=roles,
            model=model if isinstance(model, str) else None,
            wants_json=wants_json(call.body),
            known_values=vault,
        )
        if call.stream:
            return StreamGuard(call, window, whole, context, vault, self.settings.stream)
        return WholeAnswerGuard(call, window, whole, context, vault)

    def close(self) -> None:
        """Stop the worker pool of model scanners (at shutdown)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def wants_json(body: dict[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )


def answer_texts(document: dict[str, Any]) -> list[BodyText]:
    """The generated texts of a whole chat or completions answer."""
    texts: list[BodyText] = []
    choices = document.get("choices")
    if not isinstance(choices, list):
        return texts
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            texts.append(BodyText(("choices", i, "text"), choice["text"], "assistant"))
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        for name, role in _TEXT_FIELDS.items():
            if isinstance(message.get(name), str):
                texts.append(BodyText(("choices", i, "message", name), message[name], role))
        calls = message.get("tool_calls")
        for j, tool_call in enumerate(calls if isinstance(calls, list) else ()):
            function = tool_call.get("function") if isinstance(tool_call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                path = ("choices", i, "message", "tool_calls", j, "function", "arguments")
                texts.append(BodyText(path, function["arguments"], "tool_call", json_string=True))
    return texts


def _set(document: Any, path: tuple[str | int, ...], value: str) -> None:
    for step in path[:-1]:
        document = document[step]
    document[path[-1]] = value


def record(call: CallContext, reports: list[ScanReport], **facts: Any) -> None:
    """Put an answer's verdicts on the call's event and what was scanned in its state."""
    details: dict[str, str] = {}
    for report in reports:
        call.event.guard_verdicts.extend(report.verdicts)
        details.update(report.details)
    call.state[OUTPUT_STATE] = {"details": details, **facts}


class WholeAnswerGuard:
    """The output guard of one whole (non-streamed) answer."""

    def __init__(
        self,
        call: CallContext,
        window: GuardPipeline,
        whole: GuardPipeline,
        context: ScanContext,
        vault: PIIVault,
    ) -> None:
        self._call = call
        self._pipelines = (window, whole)
        self._context = context
        self._vault = vault

    async def feed(self, data: bytes) -> bytes:
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data  # not an answer (an upstream error page): nothing generated to scan
        if not isinstance(document, dict):
            return data
        texts = answer_texts(document)
        originals = [t.text for t in texts]
        reports = []
        for pipeline in self._pipelines:
            report = await pipeline.scan(texts, self._context, self._vault)
            reports.append(report)
            if report.blocked or report.failed:
                break
        record(self._call, reports, scanned_chars=sum(map(len, originals)))
        for report in reports:
            report.raise_for("output")
        changed = False
        for item, original in zip(texts, originals, strict=True):
            restored = self._vault.restore(item.text, json_string=item.json_string)
            if restored != original:
                _set(document, item.path, restored)
                changed = True
            if item.changed:  # redacted: its log probabilities would spell it out
                choice = document["choices"][item.path[1]]
                if isinstance(choice, dict) and choice.get("logprobs") is not None:
                    choice["logprobs"] = None
        summary = ";".join(s for s in (r.summary() for r in reports) if s != "pass") or "pass"
        self._call.add_header(OUTPUT_HEADER, summary.encode())
        return orjson.dumps(document) if changed else data

    async def close(self) -> bytes:
        return b""
