"""Signed erasure receipts: proof that Bastion erased a subject, checkable offline.

The receipt is a JSON object; its signature is Ed25519, by the audit signing key, over
the canonical form (RFC 8785 JCS: sorted keys, no spaces, UTF-8) of every field but
``signature`` and ``signer``. Check one with :func:`verify_receipt` and the key that
``bastion audit public-key`` prints, or with OpenSSL 3 (see README, "Data-subject rights").
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compliance.signing import fingerprint

RECEIPT_TYPE = "bastion.erasure-receipt.v1"
_UNSIGNED = ("signature", "signer")


def canonical(receipt: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: the receipt without its signature, keys sorted, compact.

    Values are strings, integers below 2**53, booleans, null, lists and objects only, for
    which this is RFC 8785's canonical form.
    """
    body = {k: v for k, v in receipt.items() if k not in _UNSIGNED}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign_receipt(key: Ed25519PrivateKey, body: Mapping[str, Any]) -> dict[str, Any]:
    receipt = {"type": RECEIPT_TYPE, **body}
    signature = key.sign(canonical(receipt))
    receipt["signer"] = fingerprint(key.public_key())
    receipt["signature"] = base64.b64encode(signature).decode()
    return receipt


def verify_receipt(receipt: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True when ``receipt`` was signed by ``public_key`` and is unchanged."""
    try:
        signature = base64.b64decode(receipt["signature"], validate=True)
        public_key.verify(signature, canonical(receipt))
    except (KeyError, ValueError, TypeError, InvalidSignature):
        return False
    return receipt.get("type") == RECEIPT_TYPE
