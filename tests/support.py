"""Process helpers for the end-to-end tests: fixture upstreams and a real gateway."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
UPSTREAM_SCRIPT = TESTS_DIR / "upstream_server.py"

START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"
) -> float:
    """Poll ``predicate`` until it is true; returns the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def run_bastion(
    args: list[str], config: dict[str, Any] | None, work_dir: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``bastion ARGS`` to completion (``--config`` is added when ``config`` is given)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    argv = [*bastion_command(), *args]
    if config is not None:
        path = work_dir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv += ["--config", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=work_dir,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def bastion_command() -> list[str]:
    """How to start the gateway CLI from this interpreter's environment."""
    script = Path(sys.executable).parent / "bastion"
    if script.exists():
        return [str(script)]
    found = shutil.which("bastion")
    if found:
        return [found]
    return [sys.executable, "-m", "gateway.cli"]


class ManagedProcess:
    """A subprocess whose stderr goes to a file, so it can never block on a full pipe."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:]

    def stop(self, timeout: float = 3.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        else:
            # Reap, and take down any child left in its process group (uvicorn workers).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def _wait_http_ok(proc: ManagedProcess, url: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{what} exited with status {proc.proc.returncode if proc.proc else '?'} "
                f"before answering {url}:\n{proc.output()}"
            )
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last_error = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(
        f"{what} did not answer 200 on {url} within {START_TIMEOUT_S}s "
        f"(last: {last_error}):\n{proc.output()}"
    )


class Upstream:
    """A running ``tests/upstream_server.py``."""

    def __init__(
        self, name: str, models: list[str] | None, log_dir: Path, port: int | None = None
    ) -> None:
        self.name = name
        self.models = models
        self.port = port or free_port()
        self.log_dir = log_dir
        self.process: ManagedProcess | None = None
        self.http = httpx.Client(base_url=self.url, timeout=5.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        argv = [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(self.port), "--name", self.name]
        if self.models is not None:
            argv += ["--models", ",".join(self.models)]
        self.process = ManagedProcess(argv, self.log_dir / f"upstream-{self.name}-{self.port}.log")
        self.process.spawn()
        _wait_http_ok(self.process, f"{self.url}/health", f"upstream {self.name}")
        return self

    def restart(self) -> Upstream:
        """Start again on the same port (after a kill or a die_mid_stream)."""
        if self.process is not None:
            self.process.stop()
        return self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.http.close()

    # --- control API -------------------------------------------------------------------
    def set_mode(self, mode: str, count: int | None = None) -> None:
        body: dict[str, Any] = {"mode": mode}
        if count is not None:
            body["count"] = count
        self.http.post("/_fixture/mode", json=body).raise_for_status()

    def set_health(self, status: int) -> None:
        self.http.post("/_fixture/health", json={"status": status}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        r = self.http.get("/_fixture/stats")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def reset(self) -> None:
        self.http.post("/_fixture/reset").raise_for_status()


DEFAULT_GATEWAY_SETTINGS: dict[str, Any] = {
    # These suites test the proxying contract of docs/contract-issue2.md, where any API key
    # is accepted: a dev setup with authentication and rate limiting off keeps later
    # features (keys, per-key buckets) out of the way.
    "dev": True,
    "auth": {"enabled": False},
    "rate_limits": {"enabled": False},
    "server": {"host": "127.0.0.1", "workers": 1, "max_body_bytes": 4 * 1024 * 1024},
    "timeouts": {"connect_s": 1.0, "read_s": 10.0},
    "health_check": {
        "enabled": True,
        "path": "/health",
        "interval_s": 0.2,
        "timeout_s": 1.0,
        "unhealthy_after": 2,
        "healthy_after": 1,
    },
    "circuit_breaker": {"failure_threshold": 3, "open_s": 1.0},
    "retry": {"max_attempts": 2},
}


def upstream_entry(
    upstream: Upstream | str,
    models: list[str] | None = None,
    weight: float = 1,
    api_key: str | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """One ``upstreams:`` item; ``upstream`` may be a running fixture or just a name."""
    if isinstance(upstream, Upstream):
        name = upstream.name
        url = url or upstream.url
        models = models or upstream.models
    else:
        name = upstream
    assert url is not None and models, "an upstream entry needs a url and models"
    entry: dict[str, Any] = {"name": name, "url": url, "models": list(models), "weight": weight}
    if api_key is not None:
        entry["api_key"] = api_key
    return entry


class Gateway:
    """A running ``bastion serve`` with a YAML written from a dict.

    ``port_via`` says how the listen port reaches it: ``"cli"`` (``--port``; the YAML names
    another, unused port), ``"env"`` (``BASTION_SERVER__PORT``; same) or ``"yaml"``.
    With ``config_via_env`` the file is named by ``BASTION_CONFIG`` instead of ``--config``.
    ``env`` adds variables (any other ``BASTION_*`` of the test runner is removed).
    """

    def __init__(
        self,
        config: dict[str, Any],
        work_dir: Path,
        *,
        port_via: str = "cli",
        config_via_env: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        assert port_via in ("cli", "env", "yaml")
        self.port = free_port()
        self.port_via = port_via
        self.yaml_port = self.port if port_via == "yaml" else free_port()
        self.config = deep_merge(config, {"server": {"port": self.yaml_port}})
        self.config_via_env = config_via_env
        self.extra_env = dict(env or {})
        self.work_dir = work_dir
        self.config_path = work_dir / f"gateway-{self.port}.yaml"
        self.process: ManagedProcess | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Gateway:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        argv = [*bastion_command(), "serve"]
        if self.config_via_env:
            env["BASTION_CONFIG"] = str(self.config_path)
        else:
            argv += ["--config", str(self.config_path)]
        if self.port_via == "cli":
            argv += ["--port", str(self.port)]
        elif self.port_via == "env":
            env["BASTION_SERVER__PORT"] = str(self.port)
        env.update(self.extra_env)
        # Its own working directory: relative paths (the default sqlite store, a dev
        # setup's key files) stay out of the repository and apart from other gateways.
        run_dir = self.work_dir / f"gateway-{self.port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            argv, self.work_dir / f"gateway-{self.port}.log", env=env, cwd=run_dir
        )
        self.process.spawn()
        _wait_http_ok(self.process, f"{self.url}/healthz", "gateway")
        return self

    def output(self) -> str:
        return self.process.output() if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.http.close()

    def admin_upstreams(self) -> dict[str, dict[str, Any]]:
        r = self.http.get("/admin/upstreams")
        r.raise_for_status()
        return {u["name"]: u for u in r.json()["upstreams"]}

    def open_fds(self) -> int:
        """Open file descriptors of the gateway process and its children."""
        total = 0
        for pid in _process_tree(self.pid):
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total


def _process_tree(root: int) -> Iterator[int]:
    yield root
    try:
        tasks = os.listdir(f"/proc/{root}/task")
    except OSError:
        return
    for task in tasks:
        try:
            children = Path(f"/proc/{root}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from _process_tree(int(child))


def gateway_config(upstreams: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """A full gateway config dict with fast test defaults; ``overrides`` deep-merge in."""
    config = deep_merge(DEFAULT_GATEWAY_SETTINGS, {"upstreams": upstreams})
    return deep_merge(config, overrides)


class ProcessPool:
    """Starts fixture upstreams and gateways and always stops them."""

    def __init__(self, work_dir: Path | None = None) -> None:
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="bastion-tests-"))
        self.upstreams: list[Upstream] = []
        self.gateways: list[Gateway] = []

    def upstream(
        self, name: str, models: list[str] | None = None, port: int | None = None
    ) -> Upstream:
        up = Upstream(name, models, self.work_dir, port=port)
        self.upstreams.append(up)
        return up.start()

    def gateway(
        self,
        upstreams: list[dict[str, Any] | Upstream],
        *,
        wait_ready: bool = True,
        port_via: str = "cli",
        config_via_env: bool = False,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Gateway:
        """Start a gateway; with ``wait_ready`` wait until /readyz says every model is served.

        ``overrides`` deep-merge into the configuration (``server={"max_body_bytes": 1}``).
        """
        entries = [u if isinstance(u, dict) else upstream_entry(u) for u in upstreams]
        gw = Gateway(
            gateway_config(entries, **overrides),
            self.work_dir,
            port_via=port_via,
            config_via_env=config_via_env,
            env=env,
        )
        self.gateways.append(gw)
        gw.start()
        if wait_ready:
            wait_until(
                lambda: gw.http.get("/readyz").status_code == 200,
                START_TIMEOUT_S,
                what=f"gateway /readyz 200 (output: {gw.output()[-500:]})",
            )
        return gw

    def report(self) -> str:
        parts = []
        for gw in self.gateways:
            parts.append(f"--- gateway :{gw.port} output (tail) ---\n{gw.output()}")
        return "\n".join(parts)

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop()
        for up in self.upstreams:
            up.stop()
        self.gateways.clear()
        self.upstreams.clear()


# --- request and response helpers ------------------------------------------------------

ERROR_KEYS = {"message", "type", "code", "param"}


def chat_body(model: str = "dev-model", content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def assert_openai_error(
    response: httpx.Response,
    status: int,
    err_type: str,
    code: str,
    param: Any = ...,
) -> dict[str, Any]:
    """The response is exactly ``{"error": {"message", "type", "code", "param"}}``."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == err_type, error
    assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    else:
        assert error["param"] is None or isinstance(error["param"], str), error
    assert response.headers.get("x-request-id"), response.headers
    result: dict[str, Any] = error
    return result


def sse_data(lines: Iterable[str]) -> list[str]:
    """The ``data:`` payloads of an SSE stream, in order."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            out.append(line[len("data:") :].strip())
    return out
