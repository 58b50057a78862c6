"""The proxy benchmark's own arithmetic: CPU time per request and per-round pairing.

The benchmark (bench/proxy_overhead.py) lives in bench/overhead/; only the parts that turn
measurements into the reported figures are tested here; running it needs nginx, wrk and
minutes of a quiet machine (bench/README.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.overhead import load
from bench.overhead.bodies import MODEL_JSON
from bench.overhead.catalog import FEATURE_OFF
from bench.overhead.cpu import process_group_cpu_s
from bench.overhead.options import parse_args
from bench.overhead.processes import Processes
from bench.overhead.report import (
    access_chain,
    combine_rounds,
    feature_costs,
    median_runs,
    paired_costs,
)
from bench.overhead.targets import Ctx, Endpoint, Target
from bench.overhead.verdict import feature_verdict
from tests.support import deep_merge


def fake_stat(pid: int, comm: str, pgrp: int, utime: int, stime: int) -> str:
    # /proc/PID/stat: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
    # majflt cmajflt utime stime ...
    return f"{pid} ({comm}) S 1 {pgrp} {pgrp} 0 -1 4194560 10 0 0 0 {utime} {stime} 0 0 20 0 1\n"


def test_group_cpu_sums_the_groups_members_only(tmp_path: Path) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    procs = {
        "100": fake_stat(100, "bastion", 100, 3 * tick, tick),
        # A command name with spaces and a parenthesis must not shift the fields.
        "101": fake_stat(101, "uvicorn) worker (1", 100, tick, tick),
        "200": fake_stat(200, "wrk", 200, 50 * tick, 50 * tick),
    }
    for pid, text in procs.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(text)
    (tmp_path / "self").mkdir()  # not a PID: skipped
    (tmp_path / "300").mkdir()  # gone before its stat was read: skipped

    assert process_group_cpu_s({100}, tmp_path) == pytest.approx(6.0)
    assert process_group_cpu_s({100, 200}, tmp_path) == pytest.approx(106.0)
    assert process_group_cpu_s({999}, tmp_path) == 0.0


def test_group_cpu_follows_real_work() -> None:
    group = os.getpgrp()
    before = process_group_cpu_s({group})
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    spent = process_group_cpu_s({group}) - before
    # Clock ticks are 10 ms; other members of the group (pytest-xdist's) only add.
    assert spent >= 0.25


def run(rps: float, cpu: float | None) -> dict[str, object]:
    return {
        "connections": 32,
        "duration_s": 5.0,
        "requests": int(rps * 5),
        "rps": rps,
        "ok_rps": rps,
        "bytes": 0,
        "errors": {"connect": 0, "status": 0},
        "error_total": 0,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "loadavg_1m_before": 0.0,
        "cpu_s": None if cpu is None else cpu * rps * 5 / 1e6,
        "cpu_us_per_request": cpu,
    }


def test_rounds_keep_cpu_medians_and_per_round_values() -> None:
    combined = median_runs([run(100.0, 10.0), run(300.0, 30.0), run(200.0, 50.0)])
    assert combined["rps"] == 200.0
    assert combined["cpu_us_per_request"] == 30.0
    assert combined["per_round_rps"] == [100.0, 300.0, 200.0]
    assert combined["per_round_cpu_us"] == [10.0, 30.0, 50.0]

    single = median_runs([run(100.0, 10.0)])
    assert single["per_round_rps"] == [100.0]
    assert single["per_round_cpu_us"] == [10.0]

    # One round without a CPU figure (a target with no process of its own): none at all.
    partial = median_runs([run(100.0, 10.0), run(300.0, None)])
    assert partial["cpu_us_per_request"] is None
    assert partial["per_round_cpu_us"] is None


def test_paired_costs() -> None:
    assert paired_costs([80.0, 90.0], [100.0, 100.0]) == pytest.approx([0.2, 0.1])
    assert paired_costs([80.0], [100.0, 100.0]) == []  # rounds do not pair up
    assert paired_costs(None, [100.0]) == []
    assert paired_costs([80.0, 90.0], [0.0, 100.0]) == pytest.approx([0.1])


def test_access_chain_reports_cpu_cost_and_rounds() -> None:
    def target(rps: list[float], cpu: list[float]) -> dict[str, object]:
        rounds = [
            {"chat": {"c1": run(r, c), "c32": run(r, c)}} for r, c in zip(rps, cpu, strict=True)
        ]
        return combine_rounds(rounds, 32)

    results = {
        "bastion-bare": target([1000.0, 1200.0, 900.0], [100.0, 90.0, 110.0]),
        "bastion-secure": target([850.0, 900.0, 800.0], [118.0, 110.0, 125.0]),
    }
    chain = access_chain(results, "chat", 32)["bastion-secure"]
    assert chain["rps_cost_c32"] == pytest.approx(1 - 850.0 / 1000.0)
    assert chain["rps_cost_c32_per_round"] == pytest.approx([0.15, 0.25, 1 - 800.0 / 900.0])
    assert chain["cpu_cost_c32"] == pytest.approx(118.0 / 100.0 - 1)
    assert chain["cpu_us_per_request_c32"] == 118.0
    assert chain["cpu_us_per_request_c32_bare"] == 100.0


def test_interleave_is_an_option() -> None:
    args = parse_args(["--interleave", "--rounds", "4", "--targets", "bastion-bare"])
    assert args.interleave and args.rounds == 4
    assert not parse_args(["--targets", "bastion-bare"]).interleave


def test_shared_round_files_together_figures_and_drops_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--shared-core: one wrk per live proxy, started together; each figure lands in the
    round its target's c=1 began, a failed proxy is stopped and loses only that round."""
    args = parse_args(["--shared-core", "--connections", "32", "--targets", "bastion-bare"])
    processes = Processes(tmp_path)
    ctx = Ctx(args, tmp_path, processes, 1, 2, 0, 1)
    sleeper = processes.start("bare", ["sleep", "30"], None)
    other = processes.start("secure", ["sleep", "30"], None)
    broken = processes.start("plain", ["sleep", "30"], None)

    def target(name: str, proc: object) -> object:
        endpoint = Endpoint(1, MODEL_JSON)
        return Target(name, endpoint, endpoint, [proc])

    live = {
        "bastion-bare": target("bastion-bare", sleeper),
        "bastion": target("bastion", broken),
        "bastion-secure": target("bastion-secure", other),
    }
    rounds = {name: [{"chat": {"c1": run(1.0, 1.0)}}] for name in live}
    started: list[float] = []

    def fake_wrk(ctx: object, endpoint: object, stream: bool, conns: int, dur: int, procs: list):
        started.append(time.monotonic())
        time.sleep(0.2)  # all three must be under way at once
        if procs[0] is broken:
            raise RuntimeError("wrk failed (status 1)")
        return run(500.0 if procs[0] is sleeper else 400.0, 10.0)

    monkeypatch.setattr(load, "run_wrk", fake_wrk)
    status: dict[str, dict[str, str]] = {}
    load.measure_shared_round(ctx, live, rounds, status, ["chat"])

    assert max(started) - min(started) < 0.15  # together, not one after another
    assert rounds["bastion-bare"][-1]["chat"]["c32"]["rps"] == 500.0
    assert rounds["bastion-secure"][-1]["chat"]["c32"]["rps"] == 400.0
    assert rounds["bastion"] == []  # the failed round is dropped, not half-filed
    assert "error" in status["bastion"]
    assert "bastion" not in live
    assert broken.popen.poll() is not None  # its server was stopped
    processes.stop_all()


def test_feature_costs_compare_the_default_chain_with_each_feature_off() -> None:
    """bastion-secure (all on) against bastion-secure-no-<feature>: that feature's cost,
    and the telemetry verdict against issue 16's 5 %."""

    def target(rps: float, cpu: float) -> dict[str, object]:
        return combine_rounds([{"chat": {"c1": run(rps, cpu), "c32": run(rps, cpu)}}], 32)

    results = {
        "bastion-secure": target(960.0, 104.0),
        "bastion-secure-no-telemetry": target(1000.0, 100.0),
        "bastion-secure-no-guards": target(1200.0, 80.0),
    }
    costs = feature_costs(results, "chat", 32)
    assert set(costs) == {"telemetry", "guards"}
    assert costs["telemetry"]["against"] == "bastion-secure-no-telemetry"
    assert costs["telemetry"]["rps_cost_c32"] == pytest.approx(0.04)
    assert costs["telemetry"]["cpu_cost_c32"] == pytest.approx(0.04)
    assert costs["telemetry"]["rps_c32_off"] == 1000.0
    assert costs["guards"]["rps_cost_c32"] == pytest.approx(0.2)

    verdicts = feature_verdict(results, 32)
    assert verdicts["telemetry"]["rps_cost_pass"] is True
    assert verdicts["guards"]["rps_cost_pass"] is None  # no throughput target
    results["bastion-secure"] = target(900.0, 110.0)
    assert feature_verdict(results, 32)["telemetry"]["rps_cost_pass"] is False
    # Without the variant with the feature off there is nothing to compare.
    del results["bastion-secure-no-guards"]
    assert set(feature_costs(results, "chat", 32)) == {"telemetry"}


def test_feature_variants_switch_off_real_settings() -> None:
    """Each feature-off variant's settings are accepted by the gateway's configuration and
    turn off what they claim; they are targets of their own, not run by default."""
    from gateway.config import Settings

    upstream = {"name": "u", "url": "http://127.0.0.1:9", "models": ["m"]}
    on = Settings(upstreams=[upstream])
    assert on.guards.enabled and on.logging.access_log  # the defaults they turn off
    off = {
        name: Settings(**deep_merge({"upstreams": [upstream]}, changes))
        for name, (_, changes) in FEATURE_OFF.items()
    }
    assert not off["bastion-secure-no-guards"].guards.enabled
    assert off["bastion-secure-no-guards"].logging.access_log
    assert not off["bastion-secure-no-telemetry"].logging.access_log
    assert off["bastion-secure-no-telemetry"].guards.enabled

    args = parse_args(["--targets", "bastion-secure-no-guards,bastion-secure"])
    assert args.target_list == ["bastion-secure", "bastion-secure-no-guards"]
    assert not set(FEATURE_OFF) & set(parse_args([]).target_list)
