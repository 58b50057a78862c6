"""The vLLM logits processor's own checks, run in vLLM's environment (torch + vLLM).

The checks live in vllm_processor_checks.py, which imports torch and vLLM and so
cannot be imported here; this test runs it with vLLM's interpreter and fails with its
report.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import REPO_ROOT, TESTS_DIR
from tests.vllm_tier import inference_python

CHECKS = TESTS_DIR / "inference" / "vllm_processor_checks.py"


@pytest.mark.timeout(300)
def test_processor_checks_pass_in_vllms_environment() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [str(inference_python()), str(CHECKS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=280,
        check=False,
    )
    report = [line for line in done.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")]
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    assert len(report) >= 8 and all(line.startswith("ok") for line in report), done.stdout
