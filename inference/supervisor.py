"""ServerProcess: run an HTTP server as a child process group, wait for health, stop it.

Nothing here knows about vLLM: the command is a list of arguments, readiness is ``GET
health_url`` answering 200. vLLM starts helper processes of its own (the engine core,
tensor-parallel workers); the child is therefore started in a session of its own, and
:meth:`ServerProcess.stop` signals the whole process group, not only the child, so that
nothing is left holding the GPU or the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self


class LaunchError(Exception):
    """The server could not be started; ``str(err)`` says why in one line."""

    def __init__(self, message: str, tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tail = list(tail)
        """The server's last output lines, oldest first."""


class ServerExited(LaunchError):
    """The server process ended on its own (before or after it was ready)."""

    def __init__(self, returncode: int, tail: Sequence[str]) -> None:
        super().__init__(f"the server exited with status {returncode}", tail)
        self.returncode = returncode


class StartupTimeout(LaunchError):
    """The server did not answer its health check within the startup timeout."""


class ServerProcess:
    """One server child process (and its process group), from start to stop.

    ::

        with ServerProcess(cmd, "http://127.0.0.1:8000/health", on_output=print) as server:
            server.wait_ready(timeout_s=600)
            server.wait()                     # until it exits or KeyboardInterrupt
    """

    def __init__(
        self,
        command: Sequence[str],
        health_url: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_output: Callable[[str], None] | None = None,
        tail_lines: int = 40,
    ) -> None:
        self.command = list(command)
        self.health_url = health_url
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._on_output = on_output
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the command in a new session (so a new process group), output piped."""
        try:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot run {self.command[0]}: {exc.strerror or exc}") from exc
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_output, args=(self._proc.stdout,), daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id, which is also its process group id."""
        return self._process().pid

    def poll(self) -> int | None:
        """The child's exit status, or None while it runs."""
        return self._process().poll()

    def running(self) -> bool:
        """Started and not yet exited."""
        return self._proc is not None and self._proc.poll() is None

    def tail(self) -> list[str]:
        """The last output lines, oldest first."""
        with self._lock:
            return list(self._tail)

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """One health probe: does ``GET health_url`` answer 200 now?"""
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout_s) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(
        self,
        timeout_s: float,
        *,
        interval_s: float = 0.25,
        on_wait: Callable[[float], None] | None = None,
    ) -> float:
        """Poll the health URL until it answers 200; returns the seconds it took.

        Raises :class:`ServerExited` (with the last output lines) if the child ends first
        and :class:`StartupTimeout` after ``timeout_s``. Neither stops the server: the
        caller does, with :meth:`stop` (or by leaving the ``with`` block).
        """
        proc = self._process()
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if proc.poll() is not None:
                raise self._exited(proc.returncode)
            if self.healthy(timeout_s=1.0):
                return time.monotonic() - start
            if elapsed >= timeout_s:
                raise StartupTimeout(
                    f"{self.health_url} did not answer 200 within {timeout_s:g} s", self.tail()
                )
            if on_wait is not None:
                on_wait(elapsed)
            time.sleep(interval_s)

    def wait(self) -> int:
        """Block until the child exits on its own; returns its status."""
        returncode = self._process().wait()
        self._join_reader()
        return returncode

    def stop(self, grace_s: float = 15.0) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace_s``.

        Returns the child's exit status (None if it was never started). Safe to call
        more than once and after the child has exited (its helpers are still stopped).
        """
        if self._proc is None:
            return None
        pgid = self._proc.pid
        deadline = time.monotonic() + grace_s
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=grace_s)
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(pgid) or self._proc.poll() is None:
            _signal_group(pgid, signal.SIGKILL)
        returncode = self._proc.wait()
        self._join_reader()
        return returncode

    def kill(self) -> None:
        """SIGKILL the whole process group now (no grace); :meth:`stop` still reaps it."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals --------------------------------------------------------------------

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        return self._proc

    def _read_output(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                self._tail.append(line)
            if self._on_output is not None:
                self._on_output(line)
        stream.close()

    def _join_reader(self) -> None:
        # Helpers that outlive the child may hold the pipe open: do not wait forever.
        if self._reader is not None:
            self._reader.join(timeout=2.0)

    def _exited(self, returncode: int) -> ServerExited:
        self._join_reader()
        return ServerExited(returncode, self.tail())


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``.

    Reads /proc where there is one, since a zombie still counts for ``killpg(pgid, 0)``
    and a container's init may never reap it; elsewhere asks the kernel.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
