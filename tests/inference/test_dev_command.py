"""``bastion dev``, the README's first command, for real: it sets up what is missing,
starts vLLM with the watermark and the gateway, prints the URL and an admin key that
the official client can use, and Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support import bastion_command, free_port, wait_until
from tests.vllm_tier import INFERENCE_VENV, VLLM_START_TIMEOUT_S, inference_python

ADMIN_KEY = re.compile(r"admin key: (bst_\S+)")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start_dev(
    tmp_path: Path, port: int, inference_port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *bastion_command(),
                "dev",
                "--port",
                str(port),
                "--inference-port",
                str(inference_port),
                "--inference-venv",
                str(INFERENCE_VENV.absolute()),
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc


@pytest.mark.timeout(600)
def test_bastion_dev_runs_the_whole_stack_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    inference_python()  # skip (or, under CI, fail) without vLLM's environment
    port, inference_port = free_port(), free_port()
    log_path = tmp_path / "dev.log"
    proc = _start_dev(tmp_path, port, inference_port, log_path)
    try:
        wait_until(
            lambda: ADMIN_KEY.search(log_path.read_text()) is not None or proc.poll() is not None,
            VLLM_START_TIMEOUT_S + 60,
            interval=0.5,
            what="bastion dev to print its admin key",
        )
        output = log_path.read_text()
        found = ADMIN_KEY.search(output)
        assert found, output[-3000:]
        assert f"on http://127.0.0.1:{port}/v1" in output
        for made in ("dev model built", "watermark key created", "master key"):
            assert made in output, made
        assert _listening(port), "the banner came before the gateway listened"

        with OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key=found.group(1),
            max_retries=0,
            timeout=60,
        ) as client:
            assert [m.id for m in client.models.list()] == ["dev-model"]
            raw = client.chat.completions.with_raw_response.create(
                model="dev-model",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=120,
                extra_body={"ignore_eos": True},
            )
            assert raw.parse().choices[0].message.content
            assert raw.headers["x-bastion-watermark"].startswith("watermarked"), raw.headers
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert r.status_code == 401  # keys are on, even in the embedded default

        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
        assert not _listening(port)
        assert not _listening(inference_port), "vLLM outlived bastion dev"
        for name in (".bastion/dev.yaml", ".bastion/dev.db", ".bastion/dev-model/config.json"):
            assert (tmp_path / name).exists(), name
        assert (tmp_path / ".bastion/watermark.keys").stat().st_mode & 0o077 == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # A second start: the same admin key; Ctrl-C the moment the banner appears stops
    # everything at once (issue 14 item 16); vLLM's health probes stay off the console.
    second_log = tmp_path / "dev-2.log"
    proc = _start_dev(tmp_path, port, inference_port, second_log)
    try:
        wait_until(
            lambda: "Ctrl-C stops it." in second_log.read_text() or proc.poll() is not None,
            VLLM_START_TIMEOUT_S + 60,
            interval=0.05,
            what="the second start's banner",
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, second_log.read_text()[-3000:]
        output = second_log.read_text()
        again = ADMIN_KEY.search(output)
        assert again and again.group(1) == found.group(1), output[-3000:]
        assert "vllm | " in output and "GET /health HTTP" not in output
        assert not _listening(port) and not _listening(inference_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
