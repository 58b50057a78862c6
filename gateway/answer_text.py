"""The text a model generated, gathered from its answer as it passes (an answer filter).

The watermark verdict, the repetition rate and the output guards all read the answer's
text; :class:`AnswerTextFilter` parses each answer once and keeps the texts on the call
(``call.state["answer_text"]``) for the filters after it and for the request event. Each
choice and each text field (content, reasoning) is kept apart: they were generated
separately, so joining them would invent word pairs the model never produced.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.pipeline import CallContext
from monitors.repetition import repetition_rate

STATE_KEY = "answer_text"
# Text fields of a choice that the model generated (vLLM's reasoning parsers put the
# thinking in reasoning_content, newer versions in reasoning).
MESSAGE_FIELDS = ("content", "reasoning_content", "reasoning")


def choice_texts(choices: Any, message_key: str, into: dict[tuple[int, str], list[str]]) -> None:
    """Append the generated text of each choice (by index and field) to ``into``."""
    if not isinstance(choices, list):
        return
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", position)
        index = index if isinstance(index, int) else position
        text = choice.get("text")
        if isinstance(text, str):
            into.setdefault((index, "text"), []).append(text)
        message = choice.get(message_key)
        if isinstance(message, dict):
            for field in MESSAGE_FIELDS:
                value = message.get(field)
                if isinstance(value, str):
                    into.setdefault((index, field), []).append(value)


class AnswerText:
    """An answer's texts by (choice index, field), as they arrived."""

    __slots__ = ("parts", "readable")

    def __init__(self) -> None:
        self.parts: dict[tuple[int, str], list[str]] = {}
        self.readable = True
        """False when a whole answer was not a JSON object: there is no text to judge."""

    def add_body(self, body: bytes) -> None:
        """A whole JSON answer."""
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.readable = False
            return
        if isinstance(document, dict):
            choice_texts(document.get("choices"), "message", self.parts)
        else:
            self.readable = False

    def add_events(self, events: bytes) -> None:
        """Whole SSE events of a stream (``data: {chunk}``)."""
        for line in events.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if b'"choices"' not in payload:
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                choice_texts(chunk.get("choices"), "delta", self.parts)

    def texts(self) -> list[str]:
        """One text per choice and field."""
        return ["".join(parts) for parts in self.parts.values()]


def answer_text_of(call: CallContext) -> AnswerText | None:
    found: AnswerText | None = call.state.get(STATE_KEY)
    return found


class _Collect:
    __slots__ = ("_call", "_text")

    def __init__(self, text: AnswerText, call: CallContext) -> None:
        self._text = text
        self._call = call

    async def feed(self, data: bytes) -> bytes:
        if self._call.stream:
            self._text.add_events(data)
        else:
            self._text.add_body(data)
        return data

    async def close(self) -> bytes:
        self._call.event.repetition_rate = repetition_rate(self._text.texts())
        return b""


class AnswerTextFilter:
    """Keeps the generated text of every text answer on its call (the first filter)."""

    def for_call(self, call: CallContext) -> _Collect:
        text = AnswerText()
        call.state[STATE_KEY] = text
        return _Collect(text, call)
