"""How ``bastion dev`` starts and stops: one signal stops it at any moment, and the
banner appears only once the gateway answers ready (so every tier behind it answers).

Before the gateway's server exists, SIGINT and SIGTERM raise ``KeyboardInterrupt`` in
the main thread, which unwinds whatever is in progress (an install, the dev model, vLLM's
start: ``running_tier`` stops vLLM on the way out). From the moment the server object is
handed over (:meth:`StopOnSignal.attach`), a signal sets its ``should_exit`` instead, so
a signal that lands while uvicorn starts (before it installs its own handlers, or during
the app's lifespan start-up) is never lost; a second one forces the exit.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Self

READY_POLL_S = 0.1
READY_PATIENCE_S = 60.0
HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """``with StopOnSignal() as stop:`` the first SIGINT or SIGTERM stops ``bastion dev``."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._server: Any = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def attach(self, server: Any) -> None:
        """From now on a signal stops this uvicorn server (one asked before: at once)."""
        self._server = server
        if self.requested.is_set():
            server.should_exit = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested.is_set()
        self.requested.set()
        server = self._server
        if server is None:
            raise KeyboardInterrupt
        if not first:
            server.force_exit = True
        server.should_exit = True


def announce_when_ready(
    ready_url: str, banner: Callable[[str | None], None], stop: StopOnSignal
) -> threading.Thread:
    """Call ``banner(None)`` once ``ready_url`` answers 200, in a thread of its own.

    After :data:`READY_PATIENCE_S` without it (the gateway listens but an upstream does
    not answer yet) the banner still appears, with ``banner(reason)``. Nothing appears
    once a stop is requested.
    """

    def wait() -> None:
        deadline = time.monotonic() + READY_PATIENCE_S
        last = "no answer"
        while not stop.requested.is_set():
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        banner(None)
                        return
            except urllib.error.HTTPError as exc:
                last = f"{ready_url} answers {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = f"{ready_url}: {exc}"
            if time.monotonic() > deadline:
                banner(last)
                return
            stop.requested.wait(READY_POLL_S)

    thread = threading.Thread(target=wait, name="bastion-dev-banner", daemon=True)
    thread.start()
    return thread
