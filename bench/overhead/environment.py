"""What the run ran on: tool and package versions, the CPU, the load (for the results)."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.overhead.catalog import BASTIONS
from bench.overhead.paths import PROJECT_VENV, REPO_ROOT


def cmd_output(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (p.stdout + p.stderr).strip()
    return text.splitlines()[0] if text else f"unavailable (status {p.returncode})"


def pkg_version(python: Path, pkg: str) -> str:
    if not python.exists():
        return "not installed"
    code = f"import importlib.metadata as m; print(m.version({pkg!r}))"
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    try:
        p = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return p.stdout.strip() if p.returncode == 0 else "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment_info(args: argparse.Namespace) -> dict[str, Any]:
    targets = args.target_list
    info: dict[str, Any] = {
        "nginx": cmd_output(["nginx", "-v"]),
        "wrk": cmd_output(["wrk", "-v"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    if "litellm" in targets:
        info["litellm"] = pkg_version(args.litellm_venv / "bin" / "python", "litellm")
        info["litellm_uvicorn"] = pkg_version(args.litellm_venv / "bin" / "python", "uvicorn")
    if any(t in BASTIONS for t in targets):
        py = PROJECT_VENV / "bin" / "python"
        info["bastion"] = pkg_version(py, "bastion")
        info["bastion_uvicorn"] = pkg_version(py, "uvicorn")
        info["bastion_git"] = cmd_output(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]
        )
    return info
