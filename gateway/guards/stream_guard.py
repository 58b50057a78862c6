"""The output guard of a streamed answer: a sliding window with a bounded hold-back.

Events (OpenAI chunks, ``data: {...}``) are queued in order; their texts are appended
to channels (gateway.guards.stream_window). Each time text arrives, a channel whose safe
cut moved is scanned: the window is what arrived since the last release plus up to
``stream.context_chars`` of released text before it (patterns across windows are seen).
Then events whose text lies entirely before the cut leave, rewritten where redactions or
placeholder restoration changed their text; events without text (role, finish reason,
usage) leave in their place in the order. So:

* no text leaves before it was part of a scanned window, and ``[DONE]`` only after the
  final scan (JSON validity over the whole answer included);
* a block raises :class:`~gateway.guards.errors.AnswerBlocked`: the forwarder ends the
  stream with an SSE error event and no ``[DONE]``; nothing of that window was sent;
* verdicts are recorded once, at the end (``[DONE]``, ``close``, block, failure); a
  stream abandoned before that records none: never a "pass" for text not scanned.

Added time to first token, worst case: the time until the first word ends (the next
whitespace) or, with no whitespace, until ``hold_back_tokens`` tokens arrived, plus one
window scan (tens of microseconds). docs/guards.md has the measurement.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.guards.body_texts import BodyText
from gateway.guards.pipeline import GuardPipeline, Redaction, ScanReport
from gateway.guards.scanner import ScanContext
from gateway.guards.settings import StreamSettings
from gateway.guards.stream_window import Channel
from gateway.guards.vault import PIIVault
from gateway.pipeline import CallContext
from monitors.request_event import GuardVerdict

OUTPUT_STATE = "guards.output"
_EVENT_END = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)")
_RANK = {"pass": 0, "flag": 1, "redact": 2, "error": 3, "block": 4}
_ROLE = {"content": "assistant", "text": "assistant", "tool_call": "tool_call"}
ChannelKey = tuple[int, str, int | None]


@dataclass(slots=True)
class _Segment:
    channel: Channel
    start: int
    end: int
    path: tuple[str | int, ...]


@dataclass(slots=True)
class _Event:
    raw: bytes
    document: dict[str, Any] | None = None
    segments: list[_Segment] = field(default_factory=list)
    finishes: set[int] = field(default_factory=set)
    done: bool = False
    opaque: str | None = None
    """The data of an event that is not JSON (not OpenAI's format, scanned as it is)."""


class StreamGuard:
    """The answer filter of one streamed call (see the module docstring)."""

    def __init__(
        self,
        call: CallContext,
        window: GuardPipeline,
        whole: GuardPipeline,
        context: ScanContext,
        vault: PIIVault,
        settings: StreamSettings,
    ) -> None:
        self._call = call
        self._window = window
        self._whole = whole
        self._context = context
        self._vault = vault
        self._release = settings.release
        self._hold_back = settings.hold_back_tokens * 4
        self._context_chars = settings.context_chars
        self._channels: dict[ChannelKey, Channel] = {}
        self._queue: deque[_Event] = deque()
        self._templates: dict[int, dict[str, Any]] = {}
        self._verdicts: dict[str, list[Any]] = {}
        self._details: dict[str, str] = {}
        self._windows = 0
        self._recorded = False

    async def feed(self, data: bytes) -> bytes:
        for raw in _EVENT_END.split(data):
            if raw:
                event = self._parse(raw)
                if event.opaque is not None:
                    await self._scan_opaque(event)
                self._queue.append(event)
        await self._advance()
        return self._emit()

    async def _scan_opaque(self, event: _Event) -> None:
        """Data that is not an OpenAI chunk is still text: scanned whole before it leaves."""
        assert event.opaque is not None
        text = BodyText((), event.opaque, "assistant")
        spans: list[Redaction] = []
        report = await self._window.scan([text], self._context, self._vault, spans=spans)
        self._aggregate(report)
        if report.failed or report.blocked:
            self._record()
            report.raise_for("output")
        if spans:
            ordered = sorted((span.start, span.end, r) for _, span, r in spans)
            cleaned, last = [], 0
            for start, end, replacement in ordered:
                if start >= last:
                    cleaned.append(event.opaque[last:start] + replacement)
                    last = end
            cleaned.append(event.opaque[last:])
            event.raw = b"data: " + "".join(cleaned).encode() + b"\n\n"

    async def close(self) -> bytes:
        if self._recorded:
            return b""
        for channel in self._channels.values():
            channel.final = True
        await self._advance()
        out = self._emit() + b"".join(self._flush(lambda c: True))
        self._record()
        return out

    # ------------------------------------------------------------------ parsing

    def _parse(self, raw: bytes) -> _Event:
        payload = b"\n".join(
            line[5:].removeprefix(b" ") for line in raw.splitlines() if line.startswith(b"data:")
        )
        if payload.strip() == b"[DONE]":
            return _Event(raw, done=True)
        try:
            document = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return _Event(raw, opaque=payload.decode("utf-8", "replace"))
        event = _Event(raw, document if isinstance(document, dict) else None)
        choices = event.document.get("choices") if event.document else None
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if isinstance(choice, dict):
                self._choice(event, position, choice)
        return event

    def _choice(self, event: _Event, position: int, choice: dict[str, Any]) -> None:
        index = choice.get("index", position)
        index = index if isinstance(index, int) else position
        assert event.document is not None
        self._templates.setdefault(index, event.document)
        base: tuple[str | int, ...] = ("choices", position)
        if isinstance(choice.get("text"), str):
            self._segment(event, (index, "text", None), choice["text"], (*base, "text"))
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for name in ("content", "reasoning_content", "reasoning"):
                if isinstance(delta.get(name), str) and delta[name]:
                    self._segment(event, (index, name, None), delta[name], (*base, "delta", name))
            calls = delta.get("tool_calls")
            for k, tool_call in enumerate(calls if isinstance(calls, list) else ()):
                function = tool_call.get("function") if isinstance(tool_call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    slot = tool_call.get("index", k)
                    path = (*base, "delta", "tool_calls", k, "function", "arguments")
                    key = (index, "tool_call", slot if isinstance(slot, int) else k)
                    self._segment(event, key, function["arguments"], path)
        if choice.get("finish_reason") is not None:
            event.finishes.add(index)

    def _segment(self, event: _Event, key: ChannelKey, text: str, path: tuple[Any, ...]) -> None:
        channel = self._channels.get(key)
        if channel is None:
            channel = Channel.open(key[0], key[1], key[2], self._vault)
            self._channels[key] = channel
        start, end = channel.append(text)
        event.segments.append(_Segment(channel, start, end, path))

    # ------------------------------------------------------------------ scanning

    async def _advance(self) -> None:
        finishing = set().union(*(e.finishes for e in self._queue))
        done = any(e.done for e in self._queue)
        for channel in self._channels.values():
            if done or channel.choice in finishing:
                channel.final = True
            await self._scan(channel)

    async def _scan(self, channel: Channel) -> None:
        cut = channel.cut(self._release, self._hold_back)
        end = len(channel.raw)
        if cut <= channel.released and not (channel.final and channel.scanned < end):
            return
        start = max(0, channel.released - self._context_chars)
        window = BodyText((), channel.raw[start:], _ROLE.get(channel.kind, "reasoning"))
        context = _with(self._context, channel.final)
        spans: list[Redaction] = []
        reports = [await self._window.scan([window], context, self._vault, spans=spans)]
        if channel.final and window.role == "assistant" and not reports[0].blocked:
            whole = BodyText((), channel.raw, "assistant")
            reports.append(await self._whole.scan([whole], context, self._vault))
        self._windows += 1
        channel.scanned = end
        for report in reports:
            self._aggregate(report)
            if report.failed or report.blocked:
                self._record()
                report.raise_for("output")
        for _, span, replacement in spans:
            s, e = start + span.start, start + span.end
            channel.redact(s, e, replacement)
            if s < cut < e:  # hold what is being redacted until it is whole
                cut = max(channel.released, s) if not channel.final else end
        channel.released = max(channel.released, cut)

    def _aggregate(self, report: ScanReport) -> None:
        for verdict in report.verdicts:
            seen = self._verdicts.get(verdict.scanner)
            if seen is None:
                self._verdicts[verdict.scanner] = [verdict.action, verdict.score, verdict.latency_s]
                continue
            if _RANK[verdict.action] > _RANK[seen[0]]:
                seen[0] = verdict.action
            seen[1] = max(seen[1], verdict.score)
            seen[2] += verdict.latency_s
        self._details.update(report.details)

    # ------------------------------------------------------------------ releasing

    def _emit(self) -> bytes:
        out: list[bytes] = []
        while self._queue:
            event = self._queue[0]
            if any(s.end > s.channel.released for s in event.segments):
                break
            self._queue.popleft()
            rewritten = self._rewrite(event)
            # What restorers still hold for channels ending here goes out before the end.
            out.extend(self._flush(lambda c, e=event: e.done or c.choice in e.finishes))
            if event.done:
                self._record()  # before [DONE] leaves: the audit may complete on it
            out.append(rewritten)
        return b"".join(out)

    def _rewrite(self, event: _Event) -> bytes:
        changed = False
        for position, segment in enumerate(event.segments):
            channel = segment.channel
            raw = channel.raw[segment.start : segment.end]
            text = channel.restorer.feed(channel.render(segment.start, segment.end))
            last = all(s.channel is not channel for s in event.segments[position + 1 :])
            if channel.choice in event.finishes and last:
                text += channel.restorer.flush()
            if text != raw:
                _set(event.document, segment.path, text)
                changed = True
                if channel.render(segment.start, segment.end) != raw:
                    _drop_logprobs(event.document, segment.path)
        if not changed or event.document is None:
            return event.raw
        return b"data: " + orjson.dumps(event.document) + b"\n\n"

    def _flush(self, which: Any) -> list[bytes]:
        """Chunks carrying what restorers still hold for finished channels."""
        out = []
        for channel in self._channels.values():
            if which(channel) and channel.restorer.holding:
                out.append(self._chunk(channel, channel.restorer.flush()))
        return out

    def _chunk(self, channel: Channel, text: str) -> bytes:
        template = self._templates.get(channel.choice, {})
        document = {k: v for k, v in template.items() if k != "choices" and k != "usage"}
        choice: dict[str, Any] = {"index": channel.choice, "finish_reason": None}
        if channel.kind == "text":
            choice["text"] = text
        elif channel.kind == "tool_call":
            call = {"index": channel.tool_index, "function": {"arguments": text}}
            choice["delta"] = {"tool_calls": [call]}
        else:
            choice["delta"] = {channel.kind: text}
        document["choices"] = [choice]
        return b"data: " + orjson.dumps(document) + b"\n\n"

    def _record(self) -> None:
        if self._recorded:
            return
        self._recorded = True
        for name, (action, score, latency) in self._verdicts.items():
            self._call.event.guard_verdicts.append(
                GuardVerdict(name, "output", action, score, latency)
            )
        self._call.state[OUTPUT_STATE] = {
            "details": dict(self._details),
            "scanned_chars": sum(c.scanned for c in self._channels.values()),
            "released_chars": sum(c.released for c in self._channels.values()),
            "windows": self._windows,
        }


def _with(context: ScanContext, final: bool) -> ScanContext:
    if context.final == final:
        return context
    return ScanContext(
        stage=context.stage,
        role=context.role,
        key_id=context.key_id,
        roles=context.roles,
        model=context.model,
        wants_json=context.wants_json,
        known_values=context.known_values,
        final=final,
    )


def _drop_logprobs(document: Any, path: tuple[str | int, ...]) -> None:
    """A redacted text's log probabilities would spell out what was redacted, token by
    token: the choice goes out without them."""
    choice = document[path[0]][path[1]]
    if isinstance(choice, dict) and choice.get("logprobs") is not None:
        choice["logprobs"] = None


def _set(document: Any, path: tuple[str | int, ...], value: str) -> None:
    for step in path[:-1]:
        document = document[step]
    document[path[-1]] = value
