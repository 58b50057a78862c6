"""The real inference tier for tests: vLLM's CPU build serving the dev model.

vLLM lives in its own environment (``.venv-inference``, made by ``make test`` through
``bastion inference install``). Where it is missing the tests that need it are skipped,
except under CI, where a missing tier is a failure: CI installs it, so its absence
means the set-up broke.
"""

from __future__ import annotations

import base64
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from inference.environment import is_installed, python_of
from tests.support import REPO_ROOT, ManagedProcess, bastion_command, free_port, wait_until

INFERENCE_VENV = Path(os.environ.get("BASTION_TEST_INFERENCE_VENV", REPO_ROOT / ".venv-inference"))
# vLLM's CPU build is ready in about 35 s on an idle 2-core machine; CI's is not idle.
VLLM_START_TIMEOUT_S = 240.0
WATERMARK_SECRET = bytes(range(100, 132))
WATERMARK_KEYS = f"t1: {base64.b64encode(WATERMARK_SECRET).decode()}\n"


def inference_python() -> Path:
    """vLLM's interpreter, or skip (fail under CI) when the tier is not installed."""
    if not is_installed(INFERENCE_VENV):
        message = (
            f"vLLM's environment {INFERENCE_VENV} is not installed "
            "(bastion inference install, or make test)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python_of(INFERENCE_VENV).absolute()


def tier_document(python: Path, model_dir: Path, port: int, **inference: Any) -> dict[str, Any]:
    """A configuration holding only what ``bastion inference serve`` reads."""
    return {
        "inference": {
            "python": str(python),
            "port": port,
            "model": str(model_dir),
            "served_model_name": "dev-model",
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 1024,
            "gpu_memory_utilization": 0.15,
            "watermark": True,
            **inference,
        }
    }


class InferenceTier:
    """``bastion inference serve`` as a child process, stopped with SIGTERM like a service."""

    def __init__(self, document: dict[str, Any], work_dir: Path, env: dict[str, str]) -> None:
        self.port = int(document["inference"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        work_dir.mkdir(parents=True, exist_ok=True)
        config = work_dir / f"tier-{self.port}.yaml"
        config.write_text(yaml.safe_dump(document, sort_keys=False))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        self.process = ManagedProcess(
            [*bastion_command(), "inference", "serve", "--config", str(config)],
            work_dir / f"tier-{self.port}.log",
            env={**clean, **env},
        )

    def start(self) -> InferenceTier:
        self.process.spawn()

        def ready() -> bool:
            if not self.process.alive():
                raise RuntimeError(f"the inference tier exited:\n{self.process.output()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, VLLM_START_TIMEOUT_S, what=f"vLLM /health on {self.url}", interval=0.5)
        return self

    def metric(self, name: str) -> float:
        """The sum of one of vLLM's Prometheus series (e.g. ``vllm:num_requests_running``)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.process.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            assert self.process.proc is not None
            self.process.proc.wait(60)


def start_tier(work_dir: Path, model_dir: Path, **inference: Any) -> InferenceTier:
    document = tier_document(inference_python(), model_dir, free_port(), **inference)
    return InferenceTier(document, work_dir, {"BASTION_WATERMARK_KEYS": WATERMARK_KEYS}).start()
