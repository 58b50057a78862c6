"""Scanner ``token_limit``: a prompt longer than the configured number of tokens.

Counted with the served model's own tokenizer (HF ``tokenizers``, its ``tokenizer.json``,
loaded from the operator's directory: never fetched) when one is configured for the
model; otherwise estimated: a quarter token per ASCII character and one per other
character (scripts such as CJK take about one token per character, so a plain
characters/4 would undercount them). The finding's ``detail`` says which was used.

llm-guard's TokenLimit has tiktoken fetch its BPE file at first use; nothing here does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.guards.scanner import Finding, ScanContext

log = logging.getLogger("bastion.guards")


def estimate_tokens(text: str) -> int:
    """A conservative token count without a tokenizer."""
    if text.isascii():
        return (len(text) + 3) // 4
    ascii_chars = sum(1 for ch in text if ch < "\x80")
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def load_tokenizers(paths: Mapping[str, Path]) -> dict[str, Any]:
    """Model name -> tokenizer, from a directory holding ``tokenizer.json`` or the file."""
    from tokenizers import Tokenizer

    loaded: dict[str, Any] = {}
    for model, path in paths.items():
        file = path if path.is_file() else path / "tokenizer.json"
        loaded[model] = Tokenizer.from_file(str(file))
    return loaded


class TokenLimitScanner:
    """Finds prompts over ``max_tokens`` (all of a request's texts together)."""

    name = "token_limit"
    whole_request = True

    def __init__(self, max_tokens: int, tokenizers: Mapping[str, Any] | None = None) -> None:
        self.max_tokens = max_tokens
        self._tokenizers = dict(tokenizers or {})

    def count(self, text: str, model: str | None) -> tuple[int, str]:
        """(tokens, how they were counted: ``tokenizer`` or ``estimate``)."""
        tokenizer = self._tokenizers.get(model) if model is not None else None
        if tokenizer is None:
            return estimate_tokens(text), "estimate"
        return len(tokenizer.encode(text, add_special_tokens=False).ids), "tokenizer"

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        # A byte-level tokenizer never makes more tokens than UTF-8 bytes: a short text
        # passes without being encoded.
        if len(text) <= self.max_tokens and len(text.encode()) <= self.max_tokens:
            return None
        tokens, method = self.count(text, context.model)
        if tokens <= self.max_tokens:
            return None
        how = "counted by the model's tokenizer" if method == "tokenizer" else "estimated"
        return Finding(
            score=1.0,
            suggested="block",
            detail=f"{tokens} tokens ({how}) over the limit of {self.max_tokens}",
        )
