"""Scanners ``pii`` (input) and ``pii_leak`` (output): personal data found by checked patterns.

Each entity is a pattern plus the check its issuer defines, so look-alike numbers pass:
card numbers must pass Luhn and start with a known issuer prefix; IBANs must have their
country's length and pass ISO 7064 mod 97-10; US SSNs follow the SSA's rules (no area
000, 666 or 9xx, no group 00, no serial 0000); UK National Insurance numbers the prefix
rules of HMRC's manual; German tax ids (opt-in) ISO 7064 mod 11,10; phone numbers need
an international prefix (``+`` or ``00``) or the North American layout and 8-15 digits
(E.164); IP addresses must parse (``ipaddress``), loopback and unspecified pass.

``pii`` redacts into the call's :class:`~gateway.guards.vault.PIIVault` (placeholders such
as ``[EMAIL_1]``, restored in the answer); ``pii_leak`` reports personal data in an answer
that the caller did not send (not in ``ScanContext.known_values``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from gateway.guards.scanner import Finding, ScanContext, Span
from gateway.guards.secrets import replace_spans
from gateway.guards.vault import PLACEHOLDER, PIIVault

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:(?:\+|00)[1-9]\d{0,2}[\s.\-]?(?:\(0?\d{1,4}\)[\s.\-]?)?\d{1,4}"
    r"(?:[\s.\-]?\d{1,5}){1,5}|\(\d{3}\)\s?\d{3}[\s.\-]\d{4}|\b\d{3}[.\-]\d{3}[.\-]\d{4})(?![\w])"
)
_CARD = re.compile(r"(?<![\d\-])(?:\d[ \-]?){12,18}\d(?![\d\-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:)(?:[0-9A-Fa-f]{0,4}:){1,6}[0-9A-Fa-f]{0,4}(?![\w:])"
)
# Simple patterns first, the issuers' rules in Python (lookaheads at every position of a
# long prompt cost more than the few candidates they would reject).
_SSN = re.compile(r"(?<![\d\-])\d{3}([\- ])\d{2}\1\d{4}(?![\d\-])")
_NINO = re.compile(r"\b[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_NINO_PREFIX = re.compile(r"(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]")
_DE_TAX = re.compile(r"(?<!\d)[1-9](?: ?\d){10}(?!\d)")

# Lengths per country (SWIFT's IBAN registry, the countries most traffic will carry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9])|35|62")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    iban = iban.replace(" ", "")
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def de_tax_id_valid(number: str) -> bool:
    """ISO 7064 MOD 11,10 check digit, and one digit repeated two or three times."""
    digits = number.replace(" ", "")
    counts = sorted((digits[:10].count(d) for d in set(digits[:10])), reverse=True)
    if counts[0] not in (2, 3) or len(digits) != 11:
        return False
    product = 10
    for ch in digits[:10]:
        total = (int(ch) + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10 == int(digits[10])


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"[ \-]", "", match.group())
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn(digits)


def _ssn(match: re.Match[str]) -> bool:
    """The SSA's rules: no area 000, 666 or 9xx, no group 00, no serial 0000."""
    digits = re.sub(r"\D", "", match.group())
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _nino(match: re.Match[str]) -> bool:
    return _NINO_PREFIX.match(match.group()) is not None


def _phone(match: re.Match[str]) -> bool:
    return 8 <= sum(ch.isdigit() for ch in match.group()) <= 15


def _ip(match: re.Match[str]) -> bool:
    try:
        address = ipaddress.ip_address(match.group())
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return False
    # "1:2:3" is no address; an IPv6 address needs a "::" or all eight groups.
    text = match.group()
    return address.version == 4 or "::" in text or text.count(":") == 7


_DETECTORS: dict[str, tuple[re.Pattern[str], object]] = {
    "EMAIL": (_EMAIL, None),
    "CREDIT_CARD": (_CARD, _card),
    "IBAN": (_IBAN, lambda m: iban_valid(m.group())),
    "US_SSN": (_SSN, _ssn),
    "UK_NINO": (_NINO, _nino),
    "DE_TAX_ID": (_DE_TAX, lambda m: de_tax_id_valid(m.group())),
    "PHONE": (_PHONE, _phone),
    "IP_ADDRESS": (_IPV4, _ip),
    "IP_ADDRESS_V6": (_IPV6, _ip),
}
# Cheap tests that must hold for an entity to be possible at all.
_HINTS: dict[str, re.Pattern[str]] = {
    "EMAIL": re.compile("@"),
    "IP_ADDRESS_V6": re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:|::"),
    "IP_ADDRESS": re.compile(r"\d\.\d{1,3}\.\d"),
    "IBAN": re.compile(r"[A-Z]{2}\d\d"),
    "UK_NINO": re.compile(r"[A-Z]{2} ?\d\d"),
    "CREDIT_CARD": re.compile(r"\d{4}[ \-]?\d{4}"),
    "PHONE": re.compile(r"[+(]\s?\d|\b00\d|\d{3}[.\-]\d{3}[.\-]\d"),
    "DE_TAX_ID": re.compile(r"\d{11}|\d \d \d"),
}
_DIGITS = re.compile(r"\d{2}")


# Entities made only of digits and separators: searched inside runs of them (found by one
# pass over the text) instead of each pattern scanning the whole text.
_IN_NUMBER_RUNS = frozenset({"CREDIT_CARD", "US_SSN", "DE_TAX_ID", "PHONE"})
_NUMBER_RUN = re.compile(r"[+(]?\d[\d \-().]*\d")
_LONGEST_RUN = 40


def _number_runs(text: str) -> list[tuple[int, int]]:
    """Spans (one character of margin each side) of digit runs that hold 7+ digits."""
    runs = []
    for match in _NUMBER_RUN.finditer(text):
        start, end = match.span()
        if end - start >= 7 and sum(ch.isdigit() for ch in match.group()) >= 7:
            runs.append((max(0, start - 1), min(len(text), end + 1)))
    return runs


def find_pii(text: str, entities: Iterable[str]) -> list[Span]:
    """Sorted, disjoint spans of personal data; an earlier entity of the table wins ties."""
    if not _DIGITS.search(text) and "@" not in text:
        return []
    wanted = set(entities)
    if "IP_ADDRESS" in wanted:
        wanted.add("IP_ADDRESS_V6")
    found: list[Span] = []
    runs: list[tuple[int, int]] | None = None
    for label, (pattern, check) in _DETECTORS.items():
        if label not in wanted:
            continue
        if label in _IN_NUMBER_RUNS:
            if runs is None:
                runs = _number_runs(text)
            matches = [m for a, b in runs for m in pattern.finditer(text, a, b)]
        else:
            hint = _HINTS.get(label)
            if hint is not None and not hint.search(text):
                continue
            matches = list(pattern.finditer(text))
        for match in matches:
            if check is not None and not check(match):  # type: ignore[operator]
                continue
            span = Span(match.start(), match.end(), label.removesuffix("_V6"))
            if not any(span.start < f.end and f.start < span.end for f in found):
                found.append(span)
    for placeholder in PLACEHOLDER.finditer(text):  # a placeholder is never PII itself
        found = [s for s in found if not placeholder.start() <= s.start < placeholder.end()]
    return sorted(found, key=lambda s: s.start)


class PIIScanner:
    """Scanner ``pii``: personal data in a prompt; redaction goes through the call's vault."""

    name = "pii"

    def __init__(self, entities: Iterable[str]) -> None:
        self.entities = tuple(entities)

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        spans = find_pii(text, self.entities)
        if not spans:
            return None
        return Finding(
            score=1.0,
            spans=spans,
            suggested="redact",
            detail="personal data: " + ", ".join(sorted({s.label for s in spans})),
            redacted=replace_spans(text, spans, lambda span: f"[{span.label}]"),
        )

    def redact_into(self, text: str, finding: Finding, vault: PIIVault) -> str:
        """``text`` with each span replaced by its placeholder in ``vault``."""
        return replace_spans(
            text,
            finding.spans,
            lambda span: vault.placeholder(span.label, text[span.start : span.end]),
        )


class PIILeakScanner:
    """Scanner ``pii_leak``: personal data in an answer that the caller did not send."""

    name = "pii_leak"

    def __init__(self, entities: Iterable[str]) -> None:
        self.entities = tuple(entities)

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        known = context.known_values
        spans = [
            span
            for span in find_pii(text, self.entities)
            if text[span.start : span.end] not in known
        ]
        if not spans:
            return None
        return Finding(
            score=1.0,
            spans=spans,
            suggested="redact",
            detail="personal data the caller did not send: "
            + ", ".join(sorted({s.label for s in spans})),
            redacted=replace_spans(text, spans, lambda span: f"[REDACTED_{span.label}]"),
        )
