"""The watermark verdict as an answer filter (``gateway.pipeline.AnswerFilter``).

A whole answer gets the verdict as a header, ``x-bastion-watermark: watermarked;
z=5.12; key=k1`` (or ``absent; z=0.41``); a stream gets it as a final SSE comment,
``: x-bastion-watermark: ...``, just before ``data: [DONE]`` (or at its end). The filter
reads the texts the answer-text filter gathered, and leaves the verdict on the call's
event and, under :data:`STATE_KEY`, for the audit entry.
"""

from __future__ import annotations

from gateway.answer_text import answer_text_of
from gateway.pipeline import CallContext
from gateway.watermark.detector import AnswerCheck, WatermarkDetector, header_value

HEADER = b"x-bastion-watermark"
STATE_KEY = "watermark.header"
"""Where the verdict (the header value) is left on the call, for the audit entry."""


class WatermarkFilter:
    """Scores one call's answer: a header on a whole answer, a comment before a stream's
    ``[DONE]`` (or at its end). Reads the texts the answer-text filter gathered."""

    __slots__ = ("_call", "_check", "_sent")

    def __init__(self, check: AnswerCheck, call: CallContext) -> None:
        self._check = check
        self._call = call
        self._sent = False

    async def feed(self, data: bytes) -> bytes:
        if self._sent:
            return data
        if not self._call.stream:
            verdict = await self._verdict()
            if verdict is not None:
                self._call.add_header(HEADER, verdict)
            return data
        done_at = _done_offset(data) if b"[DONE]" in data else -1
        if done_at < 0:
            return data
        return data[:done_at] + await self.close() + data[done_at:]

    async def close(self) -> bytes:
        """The verdict comment, unless it was sent already."""
        if self._sent or not self._call.stream:
            return b""
        verdict = await self._verdict()
        return b"" if verdict is None else b": " + HEADER + b": " + verdict + b"\n\n"

    async def _verdict(self) -> bytes | None:
        self._sent = True
        text = answer_text_of(self._call)
        if text is None or not text.readable:
            return None
        found = await self._check.detection(text.texts())
        if found is None:
            return None
        event = self._call.event
        event.watermark = "watermarked" if found.watermarked else "absent"
        event.watermark_z = found.z_score
        event.watermark_key = found.key_id if found.watermarked else None
        verdict = header_value(found)
        self._call.state[STATE_KEY] = verdict.decode("ascii")
        return verdict


def _done_offset(events: bytes) -> int:
    """Where the ``data: [DONE]`` line starts in ``events``, or -1."""
    offset = 0
    for line in events.splitlines(keepends=True):
        if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
            return offset
        offset += len(line)
    return -1


class WatermarkFilterSource:
    """The watermark filter of calls to a model with a tokenizer (answer filters)."""

    def __init__(self, detector: WatermarkDetector) -> None:
        self._detector = detector

    def for_call(self, call: CallContext) -> WatermarkFilter | None:
        check = self._detector.for_model(call.event.model_served or "")
        return None if check is None else WatermarkFilter(check, call)
