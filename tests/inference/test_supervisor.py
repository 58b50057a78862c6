"""ServerProcess and ``bastion inference serve``, on a stdlib HTTP server standing in for vLLM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from inference.supervisor import (
    LaunchError,
    ServerExited,
    ServerProcess,
    StartupTimeout,
    group_members,
)
from tests.support import bastion_command, free_port, wait_until

# A stand-in for vLLM's server: answers GET /health 200 once --delay seconds have passed
# (503 before), can fail at start, start a helper process, or ignore SIGTERM. It accepts
# (and prints) any other flag, so it also serves as `python -m vllm.entrypoints...`.
STAND_IN = """
import argparse, http.server, signal, subprocess, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--fail-after", type=float)
parser.add_argument("--helper", action="store_true")
parser.add_argument("--ignore-sigterm", action="store_true")
args, _ = parser.parse_known_args()
print("stand-in argv:", " ".join(sys.argv[1:]), flush=True)
if args.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if args.helper:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('armed', flush=True); time.sleep(600)"
    )
    helper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    helper.stdout.readline()  # it ignores SIGTERM from now on
    print(f"helper pid {helper.pid}", flush=True)
if args.fail_after is not None:
    time.sleep(args.fail_after)
    print("RuntimeError: cannot load the model weights", flush=True)
    sys.exit(3)
started = time.monotonic()


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ready = self.path == "/health" and time.monotonic() - started >= args.delay
        self.send_response(200 if ready else 503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


server = http.server.ThreadingHTTPServer((args.host, args.port), Health)
print(f"listening on {args.port}", flush=True)
server.serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return script


def start(script: Path, *flags: str, lines: list[str] | None = None) -> ServerProcess:
    port = free_port()
    server = ServerProcess(
        [sys.executable, str(script), "--port", str(port), *flags],
        f"http://127.0.0.1:{port}/health",
        on_output=lines.append if lines is not None else None,
    )
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop(grace_s=1.0)


def test_ready_once_health_answers_200(stand_in: Path, servers: list[ServerProcess]) -> None:
    lines: list[str] = []
    server = start(stand_in, "--delay", "1.0", lines=lines)
    servers.append(server)
    took = server.wait_ready(timeout_s=20, interval_s=0.1)
    assert 0.9 <= took < 15
    assert server.healthy()
    assert server.poll() is None
    wait_until(lambda: any("listening on" in line for line in lines), 5, what="output lines")
    assert server.tail()[0].startswith("stand-in argv: --port")


def test_timeout_is_an_error(stand_in: Path, servers: list[ServerProcess]) -> None:
    server = start(stand_in, "--delay", "60")
    servers.append(server)
    begun = time.monotonic()
    with pytest.raises(StartupTimeout, match=r"did not answer 200 within 1\.5 s") as caught:
        server.wait_ready(timeout_s=1.5, interval_s=0.1)
    assert 1.4 < time.monotonic() - begun < 10
    assert any("listening on" in line for line in caught.value.tail)
    assert server.poll() is None  # the caller decides to stop it


def test_early_exit_is_an_error_with_the_output(
    stand_in: Path, servers: list[ServerProcess]
) -> None:
    server = start(stand_in, "--fail-after", "0.3")
    servers.append(server)
    with pytest.raises(ServerExited) as caught:
        server.wait_ready(timeout_s=20, interval_s=0.1)
    assert caught.value.returncode == 3
    assert "exited with status 3" in str(caught.value)
    assert caught.value.tail[-1] == "RuntimeError: cannot load the model weights"


def test_stop_ends_the_whole_process_group(stand_in: Path) -> None:
    """A helper that ignores SIGTERM (like a stuck worker) is killed after the grace period."""
    lines: list[str] = []
    server = start(stand_in, "--helper", "--ignore-sigterm", lines=lines)
    server.wait_ready(timeout_s=20, interval_s=0.1)
    helper = int(next(line for line in server.tail() if line.startswith("helper pid")).split()[-1])
    assert sorted(group_members(server.pid)) == sorted([server.pid, helper])
    begun = time.monotonic()
    returncode = server.stop(grace_s=1.0)
    assert 0.9 < time.monotonic() - begun < 10
    assert returncode == -signal.SIGKILL
    assert group_members(server.pid) == []
    assert not _alive(helper)


def test_stop_is_graceful_first(stand_in: Path) -> None:
    server = start(stand_in, "--helper")
    server.wait_ready(timeout_s=20, interval_s=0.1)
    begun = time.monotonic()
    assert server.stop(grace_s=2.0) == -signal.SIGTERM
    # The helper ignores SIGTERM, so the group needed SIGKILL, but only after the grace.
    assert time.monotonic() - begun >= 1.9
    assert group_members(server.pid) == []


def test_stop_without_helpers_returns_at_once(stand_in: Path) -> None:
    server = start(stand_in)
    server.wait_ready(timeout_s=20, interval_s=0.1)
    begun = time.monotonic()
    assert server.stop(grace_s=10.0) == -signal.SIGTERM
    assert time.monotonic() - begun < 5
    assert server.stop() == -signal.SIGTERM  # idempotent


def test_a_command_that_cannot_run_is_a_launch_error(tmp_path: Path) -> None:
    server = ServerProcess([str(tmp_path / "no-such-python"), "-m", "x"], "http://127.0.0.1:9/")
    with pytest.raises(LaunchError, match=r"cannot run .*no-such-python"):
        server.start()
    assert server.stop() is None


# --- bastion inference serve, end to end, with the stand-in as `python -m vllm...` ------


@pytest.fixture
def fake_vllm(tmp_path: Path, stand_in: Path) -> Path:
    """A directory holding a ``vllm`` package whose api_server module is the stand-in."""
    root = tmp_path / "fake-vllm"
    package = root / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for directory in (package, package.parent, package.parent.parent):
        (directory / "__init__.py").write_text("")
    (package / "api_server.py").write_text(stand_in.read_text())
    return root


def serve_cli(
    tmp_path: Path, fake_vllm: Path, inference: dict[str, object]
) -> subprocess.Popen[str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    config = tmp_path / "bastion.yaml"
    document = {"inference": {"python": sys.executable, "model": str(model), **inference}}
    config.write_text(yaml.safe_dump(document))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PYTHONPATH"] = str(fake_vllm)
    env["COLUMNS"] = "200"
    return subprocess.Popen(
        [*bastion_command(), "inference", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def collect(proc: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    stream = proc.stdout

    def read() -> None:
        for line in stream:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_cli_serves_until_sigterm_then_stops_vllm(tmp_path: Path, fake_vllm: Path) -> None:
    port = free_port()
    proc = serve_cli(tmp_path, fake_vllm, {"port": port, "extra_args": ["--delay", "0.5"]})
    lines = collect(proc)
    try:
        wait_until(lambda: any("vLLM ready" in line for line in lines), 30, what="ready")
        ready = next(line for line in lines if "vLLM ready" in line)
        assert f"http://127.0.0.1:{port}/v1" in ready
        assert "serving model" in ready
        argv = next(line for line in lines if "stand-in argv:" in line)
        assert argv.startswith("vllm | ")
        assert f"--model {tmp_path / 'model'} --served-model-name model" in argv
        assert _healthy(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _healthy(port)
        assert any("stopping vLLM" in line for line in lines)
    finally:
        proc.kill()
        proc.wait()


def test_cli_reports_an_early_exit_with_its_output(tmp_path: Path, fake_vllm: Path) -> None:
    proc = serve_cli(tmp_path, fake_vllm, {"port": free_port(), "extra_args": ["--fail-after=0"]})
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "bastion: vLLM exited with status 3 before it was ready" in output
    last = output.split("last lines of")[1]
    assert "RuntimeError: cannot load the model weights" in last


def test_cli_times_out_and_stops_vllm(tmp_path: Path, fake_vllm: Path) -> None:
    port = free_port()
    settings = {"port": port, "startup_timeout_s": 1, "extra_args": ["--delay", "60"]}
    proc = serve_cli(tmp_path, fake_vllm, settings)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "did not answer 200 within 1 s (inference.startup_timeout_s)" in output
    with socket.socket() as sock:  # the stand-in listened (answering 503): now it is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_cli_refuses_a_missing_model(tmp_path: Path) -> None:
    config = tmp_path / "bastion.yaml"
    missing = tmp_path / "absent"
    config.write_text(
        yaml.safe_dump({"inference": {"python": sys.executable, "model": str(missing)}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    done = subprocess.run(
        [*bastion_command(), "inference", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"inference.model: {missing} is not a model directory" in done.stderr


def _healthy(port: int) -> bool:
    return ServerProcess([], f"http://127.0.0.1:{port}/health").healthy()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"
