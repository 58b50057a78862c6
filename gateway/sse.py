"""Server-sent events framing: pass a stream on whole events at a time.

Forwarding only complete events means that if the upstream breaks mid-event, the client
never sees half an event glued to the gateway's final error event.
"""

from __future__ import annotations


class SSEFramer:
    """Buffers a byte stream and releases it up to the last complete event."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Add ``chunk``; return every complete event buffered so far (maybe ``b""``)."""
        data = self._pending + chunk if self._pending else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if end == 0:
            self._pending = data
            return b""
        self._pending = data[end:]
        return data[:end]

    def finish(self) -> bytes:
        """What is left when the upstream ended cleanly, closed as an event."""
        rest, self._pending = self._pending, b""
        if not rest.strip():
            return b""
        return rest.rstrip(b"\r\n") + b"\n\n"
