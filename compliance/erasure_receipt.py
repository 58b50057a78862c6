"""Signed erasure receipts: proof that Bastion erased a subject, checkable offline.

The receipt is a JSON object; its signature is Ed25519, by the audit signing key, over
the canonical form (RFC 8785 JCS: sorted keys, no spaces, UTF-8) of every field but
``signature`` and ``signer``. Check one with :func:`verify_receipt` and the key that
``bastion audit public-key`` prints, or with OpenSSL 3 (see README, "Data-subject rights"),
or with ``bastion compliance verify-receipt FILE``, which says why a receipt fails
(:func:`check_receipt`) and what a valid one attests (:func:`attestation`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compliance.signing import fingerprint

# Ed25519 signatures are 64 bytes.
_SIGNATURE_BYTES = 64

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


class ReceiptInvalid(Exception):
    """The receipt does not hold; ``str()`` names the reason in a sentence."""


def check_receipt(document: Any, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The receipt in ``document`` if ``public_key`` signed it unchanged; else ReceiptInvalid.

    ``document`` is the receipt itself (what ``DELETE /privacy/subjects/{id}`` answers) or
    an access answer for an erased subject, which carries it as ``erasure_receipt``.
    """
    if isinstance(document, dict) and isinstance(document.get("erasure_receipt"), dict):
        document = document["erasure_receipt"]
    if not isinstance(document, dict) or document.get("type") != RECEIPT_TYPE:
        raise ReceiptInvalid(f'not an erasure receipt (no "type": "{RECEIPT_TYPE}")')
    encoded = document.get("signature")
    if not isinstance(encoded, str):
        raise ReceiptInvalid("the receipt carries no signature")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ReceiptInvalid("the signature is not base64") from None
    if len(signature) != _SIGNATURE_BYTES:
        raise ReceiptInvalid(
            f"the signature is {len(signature)} bytes, not the {_SIGNATURE_BYTES} of Ed25519"
        )
    expected = fingerprint(public_key)
    signer = document.get("signer")
    try:
        public_key.verify(signature, canonical(document))
    except InvalidSignature:
        if signer != expected:
            raise ReceiptInvalid(
                f"signed by another key: the receipt names signer {signer}, "
                f"the key given is {expected}"
            ) from None
        raise ReceiptInvalid(
            "the signature does not match the receipt: a field was altered after signing, "
            "or the signature replaced"
        ) from None
    except (TypeError, ValueError) as exc:  # values canonical JSON cannot hold
        raise ReceiptInvalid(f"the receipt cannot be read: {exc}") from None
    return document


def attestation(receipt: Mapping[str, Any]) -> list[str]:
    """What a valid receipt attests, one line each, for people."""
    destroyed = receipt.get("destroyed") or {}
    revoked = destroyed.get("api_keys_revoked") or []
    pseudonyms = ", ".join(receipt.get("subject_pseudonyms") or []) or "none"
    lines = [
        f"subject reference {receipt.get('subject_ref')} erased at {receipt.get('erased_at')}",
        f"{destroyed.get('data_keys', 0)} audit data key(s) destroyed: the payloads they "
        f"sealed can no longer be read (pseudonyms {pseudonyms})",
        f"{len(revoked)} API key(s) revoked" + (f": {', '.join(revoked)}" if revoked else ""),
    ]
    deleted = [name for name in ("profile", "flags") if destroyed.get(name)]
    if deleted:
        lines.append(f"{' and '.join(deleted)} deleted")
    if receipt.get("audit_entry"):
        lines.append(f"recorded in the audit log as entry {receipt['audit_entry']}")
    if receipt.get("ledger_request"):
        lines.append(f"request {receipt['ledger_request']} of the request ledger")
    return lines
