"""The uvicorn version gateway/listener.py copies code from, checked at import.

gateway/listener.py copies parts of uvicorn's httptools protocol (``data_received``) and
re-runs one of its methods with other globals (``on_headers_complete``): code written
against one uvicorn version. pyproject pins that version; :func:`check_uvicorn` compares
the installed uvicorn's functions with their fingerprints in that version and stops
start-up with a clear message when they differ, instead of running a copy of code that
changed underneath it.
"""

from __future__ import annotations

import hashlib
import inspect

import uvicorn
from uvicorn.protocols.http import httptools_impl

UVICORN_VERSION = "0.54.0"
"""The uvicorn whose httptools protocol this module copies parts of (pinned in pyproject)."""
# The first 16 hex digits of the SHA-256 of the source of each uvicorn function the
# listener copies or reruns with other globals, as in UVICORN_VERSION. Update both
# together, after re-reading the copies.
UVICORN_FINGERPRINTS = {
    "HttpToolsProtocol.data_received": "010a7ae59a5d3b1a",
    "HttpToolsProtocol.on_headers_complete": "1ea8589acfad92d8",
    "HttpToolsProtocol.on_message_complete": "1fbad42dc31fc01f",
    "RequestResponseCycle.send": "abdd8601b326a8da",
}


class UvicornMismatch(RuntimeError):
    """The installed uvicorn is not the one gateway/listener.py was written against."""


def uvicorn_fingerprints() -> dict[str, str]:
    """The installed uvicorn's fingerprints of the functions the listener copies."""
    found = {}
    for name in UVICORN_FINGERPRINTS:
        owner, attribute = name.split(".")
        function = getattr(getattr(httptools_impl, owner), attribute)
        found[name] = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    return found


def check_uvicorn() -> None:
    """Raise :class:`UvicornMismatch` unless the copied uvicorn code is the pinned one."""
    changed = sorted(
        name
        for name, digest in uvicorn_fingerprints().items()
        if digest != UVICORN_FINGERPRINTS[name]
    )
    if changed:
        raise UvicornMismatch(
            f"gateway/listener.py copies parts of uvicorn {UVICORN_VERSION}'s httptools "
            f"protocol, but uvicorn {uvicorn.__version__} is installed and its "
            f"{', '.join(changed)} differ: install uvicorn=={UVICORN_VERSION} (pyproject "
            "pins it), or review the copies against the new version and update "
            "UVICORN_VERSION and UVICORN_FINGERPRINTS."
        )
