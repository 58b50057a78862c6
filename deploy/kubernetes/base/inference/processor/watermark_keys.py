"""Watermark key files, read the same way by the generator (vLLM) and the detector (gateway).

A key file holds ``key_id: base64 secret`` lines (``#`` comments) or one JSON object
``{"key_id": "base64"}``. Each secret becomes a 64-bit watermark key through
:func:`inference.watermark.derive_key`. Rotation: add a new key id, make it the one that
generates (``watermark.generation_key_id``, or the last one listed), keep the old ids
for as long as their texts should still be detected.

Both sides also take the whole file's text from ``BASTION_WATERMARK_KEYS`` (the
container way of passing secrets); a key id found in both places is an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEYS_ENV_VAR = "BASTION_WATERMARK_KEYS"
KEY_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MIN_SECRET_BYTES = 16


class KeyFileError(ValueError):
    """A key file or variable that cannot be used; the message names its source."""


def parse_keys(text: str, source: str) -> dict[str, bytes]:
    """Secrets by key id, in the order listed; ``source`` names the text in errors."""
    pairs: list[tuple[Any, Any]] = []
    if text.lstrip()[:1] in ("{", "["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyFileError(f"{source}: not a valid JSON object of key ids") from exc
        if not isinstance(document, dict):
            raise KeyFileError(f"{source}: not a valid JSON object of key ids")
        pairs = list(document.items())
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, colon, encoded = line.partition(":")
            if not colon:
                raise KeyFileError(f"{source}: line {number}: expected 'key_id: base64 secret'")
            pairs.append((key_id.strip(), encoded.strip()))
    secrets: dict[str, bytes] = {}
    for key_id, encoded in pairs:
        if not isinstance(key_id, str) or not KEY_ID.match(key_id):
            raise KeyFileError(f"{source}: key id {key_id!r}: use 1-64 of A-Z a-z 0-9 . _ -")
        if key_id in secrets:
            raise KeyFileError(f"{source}: key id {key_id!r} appears twice")
        try:
            secret = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyFileError(f"{source}: key {key_id!r}: not valid base64") from exc
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyFileError(
                f"{source}: key {key_id!r}: at least {MIN_SECRET_BYTES} random bytes, "
                f"not {len(secret)}"
            )
        secrets[key_id] = secret
    return secrets


def load_secrets(
    keys_file: Path | None, environ: Mapping[str, str], file_source: str
) -> dict[str, bytes]:
    """The secrets of ``keys_file`` (named ``file_source`` in errors), then the variable's."""
    secrets: dict[str, bytes] = {}
    if keys_file is not None:
        try:
            text = keys_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"{file_source}: cannot read {keys_file} ({exc.strerror})") from exc
        secrets.update(parse_keys(text, file_source))
    if environ.get(KEYS_ENV_VAR):
        from_env = parse_keys(environ[KEYS_ENV_VAR], KEYS_ENV_VAR)
        for key_id in from_env.keys() & secrets.keys():
            raise KeyFileError(f"{KEYS_ENV_VAR}: key id {key_id!r} is also in {file_source}")
        secrets.update(from_env)
    return secrets


def generation_key_id(secrets: Mapping[str, bytes], chosen: str | None, source: str) -> str:
    """The key id that watermarks new text: ``chosen``, or the last one listed."""
    if not secrets:
        raise KeyFileError(f"{source}: no watermark keys")
    if chosen is None:
        return list(secrets)[-1]
    if chosen not in secrets:
        raise KeyFileError(f"{source}: {chosen!r} is not among the key ids {sorted(secrets)}")
    return chosen
