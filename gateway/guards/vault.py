"""The PII vault: placeholders for one caller's personal data, and their restoration.

One :class:`PIIVault` per call (or per conversation of one key, with ``pii.vault:
conversation``): never shared between callers, so restoring can only give a caller back
what it sent. llm-guard shares one Vault across callers (its issue 131, "not thread
safe"); LiteLLM leaked tokens across requests (issue 14516) and restored masked words as
deltas split mid-word (PR 38788). Here:

* a value always gets the same placeholder in its vault (stable within a conversation);
  numbers are never reused, and placeholders the caller wrote literally are skipped, so
  two values never share one;
* :meth:`PIIVault.restore` replaces only placeholders the vault issued;
* :class:`StreamRestorer` restores text that arrives in pieces, holding back a tail that
  may be the start of a placeholder (at most :data:`MAX_PLACEHOLDER` characters).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict

import orjson

PLACEHOLDER = re.compile(r"\[[A-Z][A-Z_]*_\d+\]")
_PARTIAL = re.compile(r"\[(?:[A-Z][A-Z_]*(?:_\d*)?)?$")
MAX_PLACEHOLDER = 40


class PIIVault:
    """Placeholders <-> values for one caller (thread-safe: model scanners run in threads)."""

    __slots__ = ("_by_key", "_counters", "_lock", "_raw", "_taken", "_values")

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], str] = {}
        self._values: dict[str, str] = {}
        self._raw: set[str] = set()
        self._counters: dict[str, int] = {}
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def reserve_literals(self, text: str) -> None:
        """Placeholder-shaped strings the caller wrote itself are never issued."""
        if "[" not in text:
            return
        with self._lock:
            for match in PLACEHOLDER.finditer(text):
                if match.group() not in self._values:
                    self._taken.add(match.group())

    def placeholder(self, label: str, value: str) -> str:
        """The placeholder of ``value`` (a new one the first time it is seen)."""
        with self._lock:
            found = self._by_key.get((label, value))
            if found is not None:
                return found
            number = self._counters.get(label, 0)
            while True:
                number += 1
                candidate = f"[{label}_{number}]"
                if candidate not in self._taken:
                    break
            self._counters[label] = number
            self._by_key[(label, value)] = candidate
            self._values[candidate] = value
            self._raw.add(value)
            return candidate

    def __contains__(self, value: object) -> bool:
        """Whether the caller sent ``value`` (for the output's leak check)."""
        return value in self._raw

    def __len__(self) -> int:
        return len(self._values)

    def value_of(self, placeholder: str) -> str | None:
        return self._values.get(placeholder)

    def restore(self, text: str, *, json_string: bool = False) -> str:
        """``text`` with the vault's placeholders replaced by their values.

        ``json_string``: the text is inside a JSON string (tool-call arguments), so values
        are escaped as JSON string content."""
        if not self._values or "[" not in text:
            return text

        def value(match: re.Match[str]) -> str:
            found = self._values.get(match.group())
            if found is None:
                return match.group()
            return orjson.dumps(found).decode()[1:-1] if json_string else found

        return PLACEHOLDER.sub(value, text)


class StreamRestorer:
    """Restores placeholders in text that arrives in pieces (one per text channel)."""

    __slots__ = ("_held", "_json", "_vault")

    def __init__(self, vault: PIIVault, *, json_string: bool = False) -> None:
        self._vault = vault
        self._json = json_string
        self._held = ""

    def feed(self, piece: str) -> str:
        """The restored text that can go out now; a possible placeholder start is held."""
        text = self._held + piece if self._held else piece
        cut = len(text)
        bracket = text.rfind("[", max(0, len(text) - MAX_PLACEHOLDER))
        if bracket >= 0 and _PARTIAL.match(text, bracket):
            cut = bracket
        self._held = text[cut:]
        return self._vault.restore(text[:cut], json_string=self._json)

    def flush(self) -> str:
        """Whatever is held, once the channel ended."""
        held, self._held = self._held, ""
        return self._vault.restore(held, json_string=self._json)

    @property
    def holding(self) -> int:
        return len(self._held)


class VaultStore:
    """Vaults kept per (key id, conversation id), for ``pii.vault: conversation``.

    Bounded (least recently used dropped first) and expiring: a conversation idle for
    ``ttl_s`` starts a fresh vault. The key id is part of the key, so a conversation id
    guessed by another caller reaches nothing of this one's.
    """

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._vaults: OrderedDict[tuple[str, str], tuple[float, PIIVault]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_id: str, conversation: str) -> PIIVault:
        now = time.monotonic()
        key = (key_id, conversation)
        with self._lock:
            found = self._vaults.pop(key, None)
            vault = found[1] if found is not None and now - found[0] < self._ttl else PIIVault()
            self._vaults[key] = (now, vault)
            while len(self._vaults) > self._max:
                self._vaults.popitem(last=False)
            return vault
