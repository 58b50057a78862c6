"""Real scanners with behaviour the tests need (a failing one, a slow model-like one)."""

from __future__ import annotations

import time

from gateway.guards.scanner import Finding, ScanContext


class BrokenScanner:
    """Raises on every text, as a scanner with a bug would."""

    name = "prompt_injection"

    def __init__(self, heavy: bool = False) -> None:
        self.heavy = heavy

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        raise ValueError("broken scanner")


class SlowScanner:
    """A model-like scanner (``heavy``) that takes ``delay_s`` per text."""

    name = "prompt_injection"
    heavy = True

    def __init__(self, delay_s: float, word: str = "attack") -> None:
        self.delay_s = delay_s
        self.word = word

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        time.sleep(self.delay_s)
        return Finding(score=0.99) if self.word in text else None


class WordScanner:
    """Finds a word (a stand-in classifier with a known answer), scoring ``score``."""

    name = "prompt_injection"

    def __init__(self, word: str = "attack", score: float = 0.7) -> None:
        self.word = word
        self.score = score

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        return Finding(score=self.score, detail="word") if self.word in text else None
