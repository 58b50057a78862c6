"""Several processes, one exposition: prometheus_client's multiprocess mode as set up by
monitors.multiprocess, with real processes writing and one rendering."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import monitors.metrics  # noqa: F401  (defines the bastion_* metrics in this process)
from monitors.metrics_listener import serve_metrics_listener
from monitors.multiprocess import (
    ENV_VAR,
    MultiprocessDirError,
    exposition_registry,
    prepare_multiprocess_dir,
    render_metrics,
    sweep_dead_workers,
)
from tests.support import REPO_ROOT, wait_until

CHAT = "/v1/chat/completions"

# A worker: writes `count` request events through a MetricsSink, holds `in_flight`
# requests open, sets its breaker gauge, says "ready" and waits to be told to exit.
WORKER = textwrap.dedent(
    f"""
    import os, sys
    from monitors.metrics_sink import InFlight, MetricsSink, UpstreamMetrics
    from monitors.multiprocess import mark_worker_dead, multiprocess_enabled
    from monitors.request_event import RequestEvent

    count, in_flight, breaker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    assert multiprocess_enabled()
    sink = MetricsSink(models=["dev-model"], routes=[{CHAT!r}], upstreams=["u1"])
    for i in range(count):
        sink.offer(RequestEvent(time_us=0, request_id=str(i), route={CHAT!r},
                                model="dev-model", upstream="u1", status=200,
                                duration_s=0.02 * (i % 7), upstream_s=0.01,
                                prompt_tokens=3, completion_tokens=5, ttft_s=0.01))
    flight = InFlight()
    for _ in range(in_flight):
        flight.enter({CHAT!r})
    UpstreamMetrics().breaker("u1", breaker)
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "exit":
        for _ in range(in_flight):
            flight.leave({CHAT!r})
        mark_worker_dead()
    """
)


class Worker:
    def __init__(self, directory: Path, count: int, in_flight: int, breaker: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env[ENV_VAR] = str(directory)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(count), str(in_flight), breaker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    directory = prepare_multiprocess_dir(tmp_path / "prom")
    yield directory
    # prepare_multiprocess_dir set the variable for the workers; monkeypatch restores it.


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.exposition import generate_latest

    return samples(generate_latest(exposition_registry(directory)).decode())


REQ = ("bastion_requests_total", (("model", "dev-model"), ("route", CHAT), ("status_class", "2xx")))
TOKENS_OUT = ("bastion_tokens_total", (("model", "dev-model"), ("type", "output")))
DURATION_COUNT = (
    "bastion_request_duration_seconds_count",
    (("model", "dev-model"), ("route", CHAT)),
)
IN_FLIGHT = ("bastion_requests_in_flight", (("route", CHAT),))
BREAKER = ("bastion_upstream_breaker_state", (("upstream", "u1"),))


def test_two_workers_sum_to_one_exposition_and_dead_workers_leave_their_gauges(
    metrics_dir: Path,
) -> None:
    a = Worker(metrics_dir, count=7, in_flight=2, breaker="open")
    b = Worker(metrics_dir, count=5, in_flight=1, breaker="closed")
    try:
        seen = scrape(metrics_dir)
        assert seen[REQ] == 12
        assert seen[TOKENS_OUT] == 60
        assert seen[DURATION_COUNT] == 12
        assert seen[IN_FLIGHT] == 3  # livesum
        assert seen[BREAKER] == 2  # livemax: one worker sees it open
        build = [k for k in seen if k[0] == "bastion_build_info"]
        assert len(build) == 1 and seen[build[0]] == 1  # one series, not one per worker

        a.kill()  # no shutdown: its live gauges stay until a sweep
        seen = scrape(metrics_dir)  # the exposition sweeps first
        assert seen[IN_FLIGHT] == 1
        assert seen[BREAKER] == 0
        assert seen[REQ] == 12  # counters of a dead worker stay: they never go down
        assert sweep_dead_workers(metrics_dir) == []

        b.exit()  # shutdown: leaves its requests, marks itself dead
        seen = scrape(metrics_dir)
        assert IN_FLIGHT not in seen or seen[IN_FLIGHT] == 0
        assert seen[REQ] == 12
    finally:
        for w in (a, b):
            if w.proc.poll() is None:
                w.kill()


def test_promtool_accepts_the_multiprocess_exposition(metrics_dir: Path) -> None:
    w = Worker(metrics_dir, count=3, in_flight=1, breaker="half_open")
    try:
        from prometheus_client.exposition import generate_latest

        text = generate_latest(exposition_registry(metrics_dir))
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        assert b"bastion_requests_total" in text
    finally:
        w.exit()


def test_the_listener_in_the_parent_serves_the_workers_sum(metrics_dir: Path) -> None:
    workers = [Worker(metrics_dir, count=4, in_flight=0, breaker="closed") for _ in range(2)]
    listener = serve_metrics_listener("127.0.0.1:0", metrics_dir)
    try:
        r = httpx.get(f"http://127.0.0.1:{listener.port}/metrics", timeout=10)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert samples(r.text)[REQ] == 8
    finally:
        listener.close()
        for w in workers:
            w.exit()


def test_prepare_makes_a_private_dir_and_clears_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    directory = tmp_path / "deep" / "prom"
    directory.mkdir(parents=True)
    (directory / "counter_99999.db").write_bytes(b"stale")
    (directory / "keep.txt").write_text("not ours")
    directory.chmod(0o755)
    assert prepare_multiprocess_dir(directory) == directory
    assert os.environ[ENV_VAR] == str(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]

    monkeypatch.delenv(ENV_VAR)
    made = prepare_multiprocess_dir(None)  # a fresh private directory
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert os.environ[ENV_VAR] == str(made)

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert prepare_multiprocess_dir(None) == tmp_path / "from-env"

    (tmp_path / "a-file").write_text("")
    with pytest.raises(MultiprocessDirError, match="a-file"):
        prepare_multiprocess_dir(tmp_path / "a-file")


def test_render_metrics_in_one_process_reads_its_own_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The variable set after prometheus_client was imported (a --workers 1 process whose
    # parent prepared a directory) must not switch this process to empty files.
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    body, content_type = render_metrics()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"bastion_build_info{" in body
    assert b"process_cpu_seconds_total" in body or b"python_info" in body
    body, content_type = render_metrics("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_a_worker_started_before_the_variable_is_single_process() -> None:
    # Documented ordering: the variable must be set before prometheus_client is imported.
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    code = (
        f"import prometheus_client, os; os.environ['{ENV_VAR}'] = '/nonexistent';"
        "from monitors.multiprocess import multiprocess_enabled;"
        "print(multiprocess_enabled())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_sweep_leaves_live_workers_alone(metrics_dir: Path) -> None:
    w = Worker(metrics_dir, count=1, in_flight=1, breaker="closed")
    try:
        assert sweep_dead_workers(metrics_dir) == []
        wait_until(lambda: scrape(metrics_dir)[IN_FLIGHT] == 1, 5, what="in flight 1")
        time.sleep(0.01)
        assert scrape(metrics_dir)[IN_FLIGHT] == 1
    finally:
        w.exit()


def test_a_real_prometheus_scrapes_the_listener_and_sees_the_sum(
    metrics_dir: Path, tmp_path: Path
) -> None:
    # Prometheus asks for OpenMetrics first: the listener's answer must parse there too.
    from tests.dashboards.prometheus_server import PrometheusServer

    workers = [Worker(metrics_dir, count=5, in_flight=1, breaker="closed") for _ in range(2)]
    listener = serve_metrics_listener("127.0.0.1:0", metrics_dir)
    target = f"127.0.0.1:{listener.port}"
    prometheus = PrometheusServer(
        tmp_path / "prometheus",
        [{"job_name": "bastion", "static_configs": [{"targets": [target]}]}],
    ).start()
    try:

        def value(expr: str) -> float | None:
            result = prometheus.query(expr).get("data", {}).get("result") or []
            return float(result[0]["value"][1]) if result else None

        wait_until(lambda: value('up{job="bastion"}') == 1, 30, what="listener scraped")
        wait_until(
            lambda: value(f'sum(bastion_requests_total{{route="{CHAT}"}})') == 10,
            30,
            what="bastion_requests_total = 10 in Prometheus",
        )
        assert value(f'bastion_requests_in_flight{{route="{CHAT}"}}') == 2
        assert value("count(bastion_build_info)") == 1
        assert value("scrape_samples_post_metric_relabeling") is not None
    finally:
        prometheus.stop()
        listener.close()
        for w in workers:
            w.exit()


def test_sample_value_reads_the_sum_of_the_workers(
    metrics_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitors import multiprocess

    workers = [Worker(metrics_dir, count=3, in_flight=0, breaker="closed") for _ in range(2)]
    try:
        # As in a worker (multiprocess mode), which this test process is not.
        monkeypatch.setattr(multiprocess, "multiprocess_enabled", lambda: True)
        labels = {"route": CHAT, "model": "dev-model", "status_class": "2xx"}
        assert multiprocess.sample_value("bastion_requests_total", labels) == 6
        assert multiprocess.sample_value("bastion_requests_total", {"route": "x"}) is None
    finally:
        for w in workers:
            w.exit()
