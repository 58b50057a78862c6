"""One text channel of a streamed answer: what arrived, what was scanned, what was released.

A channel is one text the model generates in a stream: a choice's ``content`` (or
``reasoning_content``, completions' ``text``), or one tool call's ``arguments``. Text is
released only up to a *cut* that was part of a scanned window, and the cut never falls
inside something a scanner could still be reading:

* ``word``: before the last word still arriving (a secret, an e-mail address or a
  placeholder has no space in it), and before a run of short number groups next to it
  (``+44 20 7946 0958``, ``DE89 3704 0044``, ``4111 1111 1111 1111``);
* ``sentence``: after the last sentence end;
* never more than ``hold_back`` characters behind what arrived: beyond that, scanned text
  is released even in the middle of a word (a bound on the added latency).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.guards.vault import PIIVault, StreamRestorer

_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f\n][\"')\]\u201d]*(?:\s|$)")
_NUMBER_GROUP = re.compile(r"[+(]?\d[\d)\-.]{0,8}|[A-Z0-9]{4}|[A-Z]{2}\d\d")
NUMBER_RUN = 48
"""Characters of adjacent number groups kept together with the word still arriving."""


def word_cut(text: str, lo: int) -> int:
    """The last safe release point at or after ``lo`` in ``text`` (see the module doc)."""
    i = len(text)
    while i > lo and not text[i - 1].isspace():
        i -= 1
    if i == lo:
        return lo
    tail_start = i
    while True:
        k = i
        while k > lo and text[k - 1] in " \t":
            k -= 1
        t = k
        while t > lo and not text[t - 1].isspace():
            t -= 1
        token = text[t:k]
        if t == k or tail_start - t > NUMBER_RUN or not _NUMBER_GROUP.fullmatch(token):
            return i
        i = t
        if i == lo:
            return lo


def sentence_cut(text: str, lo: int) -> int:
    last = lo
    for match in _SENTENCE_END.finditer(text, lo):
        last = match.end()
    return last


@dataclass(slots=True)
class Channel:
    """One text channel of a stream (see the module docstring)."""

    choice: int
    kind: str
    """``content``, ``reasoning_content``, ``reasoning``, ``text`` or ``tool_call``."""
    tool_index: int | None
    restorer: StreamRestorer
    raw: str = ""
    released: int = 0
    scanned: int = 0
    final: bool = False
    redactions: list[tuple[int, int, str]] = field(default_factory=list)
    """Ranges of ``raw`` replaced when released (sorted, disjoint)."""

    @classmethod
    def open(cls, choice: int, kind: str, tool_index: int | None, vault: PIIVault) -> Channel:
        restorer = StreamRestorer(vault, json_string=kind == "tool_call")
        return cls(choice, kind, tool_index, restorer)

    def append(self, text: str) -> tuple[int, int]:
        start = len(self.raw)
        self.raw += text
        return start, len(self.raw)

    def cut(self, release: str, hold_back: int) -> int:
        """Where released text may end now (at least where it ends already)."""
        end = len(self.raw)
        if self.final:
            return end
        at = sentence_cut(self.raw, self.released) if release == "sentence" else end
        if release == "word" or end - at > hold_back:
            at = word_cut(self.raw, self.released)  # over the bound: at least whole words
        return max(at, end - hold_back, self.released)

    def redact(self, start: int, end: int, replacement: str) -> None:
        """Replace ``raw[start:end]`` when released; overlapping ranges become one (a
        secret seen in part at a window's end, then whole, is replaced once)."""
        kept = []
        for s, e, r in self.redactions:
            if s < end and start < e:
                start, end = min(s, start), max(e, end)
                replacement = r if s <= start else replacement
            else:
                kept.append((s, e, r))
        kept.append((start, end, replacement))
        self.redactions = sorted(kept)

    def render(self, start: int, end: int) -> str:
        """``raw[start:end]`` with its redactions applied (each written where it starts)."""
        if not self.redactions:
            return self.raw[start:end]
        out: list[str] = []
        pos = start
        for s, e, replacement in self.redactions:
            if e <= start or s >= end:
                continue
            if s > pos:
                out.append(self.raw[pos:s])
            if start <= s:
                out.append(replacement)
            pos = max(pos, min(e, end))
        if pos < end:
            out.append(self.raw[pos:end])
        return "".join(out)
