"""Scanner ``invisible_text``: characters that hide or reorder text the reader never sees.

llm-guard's InvisibleText bans only the categories Cf, Co and Cn, so variation selectors
(Mn), Hangul fillers (Lo) and supplementary variation selectors pass it. This scanner
catches, and redaction strips:

* tag characters U+E0000-E007F (they spell ASCII invisibly: "ASCII smuggling"), except
  in the subdivision flags of Unicode's emoji tag sequences (England, Scotland, Wales);
* variation selectors U+FE00-FE0F and U+E0100-E01EF, except a single U+FE0E/U+FE0F right
  after a character that has a text/emoji presentation (an emoji such as U+2764 U+FE0F);
* Hangul fillers (U+115F, U+1160, U+3164, U+FFA0), which render as blank;
* bidi overrides and isolates (U+202A-202E, U+2066-2069) that reorder what is displayed,
  and, in text without right-to-left letters, the marks U+200E/U+200F/U+061C;
* zero-width characters (U+200B-200D, U+2060, U+FEFF, U+180E, U+00AD) placed inside
  a word, e.g. ``ig\\u200bnore``; a zero-width joiner between two emoji (family and
  profession sequences) and a zero-width non-joiner next to Arabic or Indic letters
  (where it shapes the word) pass;
* private-use and unassigned code points.

Text in Arabic or Hebrew passes: its right-to-left marks are part of writing it.
"""

from __future__ import annotations

import re
import unicodedata

from gateway.guards.scanner import Finding, ScanContext, Span

_TAGS = "\U000e0000-\U000e007f"
_VS = "\ufe00-\ufe0f\U000e0100-\U000e01ef"
_FILLERS = "\u115f\u1160\u3164\uffa0"
_BIDI = "\u202a-\u202e\u2066-\u2069"
_MARKS = "\u200e\u200f\u061c"
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad"
_PRIVATE = "\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd"

# One pass finds every candidate; the cheap test first keeps clean text at one regex scan.
_CANDIDATE = re.compile(f"[{_TAGS}{_VS}{_FILLERS}{_BIDI}{_MARKS}{_ZERO_WIDTH}{_PRIVATE}]+")
# Subdivision flags (England, Scotland, Wales) are the one legitimate use of tag
# characters: a black flag, two to six tag letters or digits, a cancel tag.
_FLAG = re.compile("\U0001f3f4[\U000e0030-\U000e0039\U000e0061-\U000e007a]{2,6}\U000e007f")
_RTL_LETTER = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")
# Scripts where ZWNJ/ZWJ change how letters join (Arabic, Syriac, Indic, Sinhala...).
_JOINING_SCRIPT = re.compile("[\u0600-\u08ff\u0900-\u0dff\ufb50-\ufdff\ufe70-\ufefc]")


def _is_emoji(char: str) -> bool:
    """Pictographs, symbols and modifiers that take part in emoji sequences."""
    cp = ord(char)
    return (
        0x1F000 <= cp <= 0x1FAFF
        or 0x2600 <= cp <= 0x27BF
        or 0x2190 <= cp <= 0x21FF
        or 0x2300 <= cp <= 0x23FF
        or 0x2B00 <= cp <= 0x2BFF
        or cp in (0x00A9, 0x00AE, 0x203C, 0x2049, 0x2122, 0x2139, 0x3030, 0x303D)
        or unicodedata.category(char) == "So"
    )


def _label(char: str) -> str:
    cp = ord(char)
    if 0xE0000 <= cp <= 0xE007F:
        return "tag_characters"
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
        return "variation_selector"
    if char in _FILLERS:
        return "hangul_filler"
    if 0x202A <= cp <= 0x202E or 0x2066 <= cp <= 0x2069 or char in _MARKS:
        return "bidi_control"
    if char in _ZERO_WIDTH:
        return "zero_width"
    return "private_use"


class InvisibleTextScanner:
    """Finds hidden characters; its redaction removes them (see the module docstring)."""

    name = "invisible_text"

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        if text.isascii():
            return None
        spans: list[Span] = []
        rtl: bool | None = None
        flags: set[int] = set()
        if "\U0001f3f4" in text:
            for flag in _FLAG.finditer(text):
                flags.update(range(flag.start(), flag.end()))
        for match in _CANDIDATE.finditer(text):
            start, end = match.span()
            for i in range(start, end):
                char = text[i]
                if i in flags:
                    continue
                label = _label(char)
                if label == "bidi_control" and char in _MARKS:
                    if rtl is None:
                        rtl = _RTL_LETTER.search(text) is not None
                    if rtl:
                        continue
                if label == "variation_selector" and self._presentation(text, i, start):
                    continue
                if label == "zero_width" and self._joins(text, i):
                    continue
                spans.append(Span(i, i + 1, label))
        if not spans:
            return None
        return Finding(
            score=1.0,
            spans=_merge(spans),
            suggested="block",
            detail="hidden characters: " + ", ".join(sorted({s.label for s in spans})),
            redacted=_strip(text, spans),
        )

    @staticmethod
    def _presentation(text: str, i: int, run_start: int) -> bool:
        """A lone text/emoji presentation selector after a visible base character."""
        if text[i] not in "\ufe0e\ufe0f" or i != run_start or i == 0:
            return False
        base = text[i - 1]
        return not base.isspace() and unicodedata.category(base)[0] in "SNLP"

    @staticmethod
    def _joins(text: str, i: int) -> bool:
        """A ZWJ inside an emoji sequence, or a ZWJ/ZWNJ shaping a joining script."""
        char = text[i]
        if char not in "\u200c\u200d" or i == 0 or i + 1 >= len(text):
            return False
        before, after = text[i - 1], text[i + 1]
        if char == "\u200d":
            # The emoji before may carry a presentation selector or a skin-tone modifier.
            if (before in "\ufe0f" and i >= 2) or (0x1F3FB <= ord(before) <= 0x1F3FF and i >= 2):
                before = text[i - 2]
            if _is_emoji(before) and _is_emoji(after):
                return True
        return bool(_JOINING_SCRIPT.match(before) and _JOINING_SCRIPT.match(after))


def _merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for span in spans:
        last = merged[-1] if merged else None
        if last is not None and last.end == span.start and last.label == span.label:
            merged[-1] = Span(last.start, span.end, span.label)
        else:
            merged.append(span)
    return merged


def _strip(text: str, spans: list[Span]) -> str:
    drop = {i for span in spans for i in range(span.start, span.end)}
    return "".join(ch for i, ch in enumerate(text) if i not in drop)
