"""The watermark keys a gateway checks answers against, from the configuration."""

from __future__ import annotations

import os
from collections.abc import Mapping

from gateway.config import ConfigError, WatermarkSettings
from inference import watermark_keys
from inference.watermark import derive_key
from inference.watermark_keys import KEYS_ENV_VAR

__all__ = ["KEYS_ENV_VAR", "load_watermark_keys", "parse_keys"]


def parse_keys(text: str, source: str) -> dict[str, bytes]:
    """``key_id: base64`` lines (``#`` comments) or a JSON object, into secrets by key id."""
    try:
        return watermark_keys.parse_keys(text, source)
    except watermark_keys.KeyFileError as exc:
        raise ConfigError(str(exc)) from exc


def load_watermark_keys(
    settings: WatermarkSettings, environ: Mapping[str, str] = os.environ
) -> dict[str, int]:
    """Every configured watermark key (64-bit, derived from its secret) by key id."""
    try:
        secrets = watermark_keys.load_secrets(settings.keys_file, environ, "watermark.keys_file")
    except watermark_keys.KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    if not secrets:
        raise ConfigError(
            f"watermark.enabled: no watermark keys; set watermark.keys_file or {KEYS_ENV_VAR}"
        )
    return {key_id: derive_key(secret, key_id) for key_id, secret in secrets.items()}
