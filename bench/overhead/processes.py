"""The servers a run starts (each in its own process group, pinned to a core) and how the
script talks to them over HTTP(S) while it waits for them to be ready."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

from bench.overhead.paths import API_KEY, REPO_ROOT
from tests.support import ManagedProcess


def pin_prefix(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


class Proc(ManagedProcess):
    """A server started in its own process group, stopped with the whole group."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(argv, log, env=env, cwd=cwd or REPO_ROOT)
        self.name = name

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, "not started"
        return self.proc

    @property
    def log(self) -> Path:
        return self.log_path

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        # Children that outlived their leader (e.g. uvicorn workers) still share the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every server this run starts; stop_all() runs when the run ends, however it ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        cpu: int | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        proc = Proc(name, [*pin_prefix(cpu), *cmd], self.workdir / f"{name}.log", env, cwd)
        proc.spawn()
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()


def http_request(
    url_host: str,
    port: int,
    method: str,
    path: str,
    body: str | None = None,
    timeout: float = 10.0,
    api_key: str = API_KEY,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(url_host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {api_key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(
            method, path, body=body.encode() if body is not None else None, headers=headers
        )
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def wait_ready(
    proc: Proc,
    port: int,
    path: str,
    timeout_s: float,
    api_key: str = API_KEY,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Poll GET path until it answers 2xx; fail early if the process died or answers 4xx
    (an answer that will not change by waiting). With tls, over https, verified by it."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_tail()
            last_line = next((x for x in reversed(tail.splitlines()) if x.strip()), "")
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode} before it was ready:"
                f" {last_line.strip()}\nlog tail:\n{tail}"
            )
        try:
            status, _, data = http_request(
                "127.0.0.1", port, "GET", path, timeout=2.0, api_key=api_key, tls=tls
            )
            if 200 <= status < 300:
                return
            last = f"HTTP {status}: {data[:300].decode(errors='replace')}"
            if 400 <= status < 500:
                raise RuntimeError(f"{proc.name}: GET {path} answered {last}")
        except ssl.SSLCertVerificationError as exc:  # waiting will not fix the certificate
            raise RuntimeError(f"{proc.name}: TLS certificate not accepted: {exc}") from exc
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(
        f"{proc.name} not ready on :{port}{path} after {timeout_s:.0f}s ({last}); log tail:\n"
        f"{proc.log_tail()}"
    )
