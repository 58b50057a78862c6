"""The default pipelines never reach the network (no model hub, no BPE file, no nltk)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, orjson
from gateway.guards.settings import GuardSettings
from gateway.guards.input_check import InputGuard
from gateway.guards.output_filter import OutputGuard
from tests.guards.calls import make_call, chat, answer, chunk, DONE

async def main():
    settings = GuardSettings()
    inputs, outputs = InputGuard(settings), OutputGuard(settings)
    assert "prompt_injection" in inputs.scanners, sorted(inputs.scanners)
    call = make_call(chat("I am jane@example.com, visit http://example.com/x"))
    await inputs.check(call)
    await outputs.for_call(call).feed(answer("Hi [EMAIL_1], see https://example.org"))
    streamed = make_call(chat("hello"), stream=True)
    await inputs.check(streamed)
    f = outputs.for_call(streamed)
    await f.feed(chunk("Hi there http://example.net") + chunk(finish="stop") + DONE)
    await f.close()
    print("OK", len(call.event.guard_verdicts), len(streamed.event.guard_verdicts))

asyncio.run(main())
"""


def test_default_pipelines_try_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network is cut off in this test")

    def refuse_lookup(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network is cut off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    namespace: dict[str, object] = {"__name__": "offline_check"}
    exec(compile(SCRIPT.replace("asyncio.run(main())", ""), "offline", "exec"), namespace)
    import asyncio

    asyncio.run(namespace["main"]())  # type: ignore[arg-type]
    assert attempts == []


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare as root"
)
def test_default_pipelines_in_a_network_namespace_without_network() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("OK")
