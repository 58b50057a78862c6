"""One exposition for several worker processes (prometheus_client's multiprocess mode).

Under ``bastion serve --workers N`` each worker counts its own requests; answering
``/metrics`` from the answering worker's memory alone makes successive scrapes disagree.
prometheus_client's multiprocess mode keeps each worker's values in memory-mapped files
in one directory (``PROMETHEUS_MULTIPROC_DIR``) and a :class:`MultiProcessCollector` sums
them at scrape time, whichever worker answers.

The order matters. prometheus_client chooses where values live once, when
``prometheus_client.values`` is first imported, from the environment variable. So the
variable must be set before a worker imports it: ``bastion serve`` calls
:func:`prepare_multiprocess_dir` in the parent, before uvicorn starts its workers, which
uvicorn *spawns* (fresh interpreters that inherit the environment and import everything
anew). The parent itself imported prometheus_client long before: its own metrics stay in
memory and are never exposed, which is right, since it serves no requests.

With one worker (``--workers 1``, ``bastion dev``, tests) nothing is set up: uvicorn runs
in the same process, which already imported prometheus_client, so multiprocess mode could
not be switched on there anyway, and the in-memory registry is exact and cheaper.

Dead workers. Counters and histograms of a worker that exited stay in the sum (a counter
must never go down). Its ``live*`` gauges (requests in flight, breaker state, queue
depths) must go: a worker calls :func:`mark_worker_dead` for itself at shutdown (the
app's lifespan), and every exposition first sweeps the files of workers that no longer
exist (:func:`sweep_dead_workers`), which covers a worker killed without a shutdown.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)

_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


class MultiprocessDirError(RuntimeError):
    """The directory cannot hold the workers' metric files safely."""


def prepare_multiprocess_dir(path: Path | str | None = None) -> Path:
    """Make the workers' metric directory and point ``PROMETHEUS_MULTIPROC_DIR`` at it.

    ``path``: the directory to use (created 0700 if missing); None uses
    ``$PROMETHEUS_MULTIPROC_DIR`` if the operator set it, else a fresh private directory
    under the system's temporary directory, removed when this process exits. Files left
    by an earlier run are removed: their counts belong to processes that are gone, and
    a new worker that happened to get an old pid would carry them on. Call it in the
    parent, before the workers start; one directory per ``bastion serve``.
    """
    chosen = path if path is not None else os.environ.get(ENV_VAR)
    if chosen is None:
        directory = Path(tempfile.mkdtemp(prefix="bastion-metrics-"))  # 0700, ours
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    else:
        directory = Path(chosen)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.lstat()
        except OSError as exc:
            raise MultiprocessDirError(f"metrics directory {directory}: {exc}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise MultiprocessDirError(f"metrics directory {directory} is not a directory")
        if info.st_uid != os.getuid():
            # Another user's directory could feed us made-up numbers or read ours.
            raise MultiprocessDirError(
                f"metrics directory {directory} belongs to uid {info.st_uid}, not to this user"
            )
        os.chmod(directory, 0o700)
        removed = clear_metric_files(directory)
        if removed:
            log.info("removed %d stale metric files from %s", removed, directory)
    os.environ[ENV_VAR] = str(directory)
    return directory


def clear_metric_files(directory: Path) -> int:
    """Remove every ``*.db`` metric file in ``directory``; returns how many."""
    removed = 0
    for name in glob.glob(os.path.join(directory, "*.db")):
        try:
            os.remove(name)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def multiprocess_enabled() -> bool:
    """Whether this process keeps its metric values in the shared files.

    True only when ``PROMETHEUS_MULTIPROC_DIR`` was set before prometheus_client was
    imported here (a worker of ``bastion serve --workers N``).
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def mark_worker_dead(pid: int | None = None, directory: Path | str | None = None) -> None:
    """Drop a worker's ``live*`` gauges (default: this process, at its shutdown)."""
    path = directory if directory is not None else os.environ.get(ENV_VAR)
    if path is None:
        return
    mark_process_dead(os.getpid() if pid is None else pid, str(path))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def sweep_dead_workers(directory: Path | str) -> list[int]:
    """Drop the ``live*`` gauges of every worker whose process is gone; returns their pids.

    A worker killed (SIGKILL, out of memory) never reaches its shutdown: without this its
    in-flight count would stay in the sum for good. A pid reused by an unrelated process
    keeps its files until that process exits too (gauges only; counters are unaffected).
    """
    dead: set[int] = set()
    for name in os.listdir(directory):
        match = _LIVE_FILE.match(name)
        if match is not None and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


class _SweepingCollector(Collector):
    """The multiprocess sum, after dropping the live gauges of dead workers."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._collector = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        sweep_dead_workers(self._directory)
        metrics: Iterable[Metric] = self._collector.collect()  # type: ignore[no-untyped-call]
        return metrics


def exposition_registry(directory: Path | str | None = None) -> CollectorRegistry:
    """What to expose: every worker's files summed, or this process's registry.

    ``directory`` names the multiprocess directory explicitly (the parent of the workers,
    whose own prometheus_client is not in multiprocess mode); without it, the shared
    files are read when this process writes into them, else the default registry.
    """
    if directory is None and multiprocess_enabled():
        directory = os.environ.get(ENV_VAR)
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SweepingCollector(str(directory)))
    return registry


def render_metrics(accept: str | None = None) -> tuple[bytes, str]:
    """The ``/metrics`` body and its content type, correct with one worker or several.

    ``accept``: the request's Accept header; OpenMetrics when it asks for it, else
    Prometheus' text format 0.0.4.
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(exposition_registry()), content_type


def sample_value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample's value as a scrape would show it (every worker's sum), or None.

    For code that reads a metric back (the AI Act report's watermark counts): the default
    registry's ``get_sample_value`` would give only this worker's share.
    """
    return exposition_registry().get_sample_value(name, labels or {})
