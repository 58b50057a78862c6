"""The command line: options, then the run (start each target, measure it, stop it),
then the tables, the verdicts and the results file. ``bench/proxy_overhead.py`` calls
:func:`main`."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.overhead.bastion import start_bastion
from bench.overhead.bodies import MODEL_JSON, request_body
from bench.overhead.catalog import (
    BASTIONS,
    CHAIN_BASE,
    CHAIN_VARIANTS,
    FEATURE_BASE,
    SCENARIOS,
)
from bench.overhead.environment import environment_info
from bench.overhead.load import measure_shared_round, measure_target
from bench.overhead.options import check_tools, parse_args
from bench.overhead.paths import RESULTS_DIR
from bench.overhead.processes import Processes
from bench.overhead.report import (
    access_chain,
    combine_rounds,
    derive,
    error_str,
    feature_costs,
    get,
    print_tables,
)
from bench.overhead.targets import (
    Ctx,
    SkipTarget,
    Target,
    start_direct,
    start_litellm,
    start_nginx_proxy,
    start_upstream,
)
from bench.overhead.verdict import (
    VERDICT_TARGETS,
    chain_verdict,
    feature_verdict,
    print_chain_verdict,
    print_feature_verdict,
    print_verdict,
    verdict,
)
from tests.support import free_port

STARTERS: dict[str, Callable[[Ctx], Target]] = {
    "direct": start_direct,
    "nginx": start_nginx_proxy,
    "litellm": start_litellm,
    **{name: functools.partial(start_bastion, name=name) for name in BASTIONS},
}


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same path as Ctrl-C: stop everything, keep partial results


@dataclass
class Run:
    """What the run measured so far, target by target."""

    rounds: dict[str, list[dict[str, Any]]]
    """Per target, one ``{scenario: {cN: result} | {error}}`` per round measured."""
    status: dict[str, dict[str, str]] = field(default_factory=dict)
    """Targets skipped or failed: ``{"skipped": why}`` or ``{"error": what}``."""
    setup: dict[str, dict[str, Any]] = field(default_factory=dict)
    """What each started target reported about itself (Target.info), for the results."""
    interrupted: bool = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    # Ctrl-C must reach the cleanup even when started in the background (where SIGINT is
    # ignored by default).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    gateway_cpu, load_cpu = pinning(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    processes = Processes(workdir)
    ctx = Ctx(args, workdir, processes, free_port(), free_port(), gateway_cpu, load_cpu)
    scenarios = ["chat", "stream"] if args.stream else ["chat"]
    info = environment_info(args)
    print_header(ctx, info, scenarios)

    run = Run({t: [] for t in args.target_list})
    try:
        if not measure_all(ctx, scenarios, run):
            return 1
    finally:
        processes.stop_all()
        if args.keep_tmp:
            print(f"  configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results = collect(args, run)
    problems = print_report(args, results)
    info["loadavg_end"] = os.getloadavg()
    report = results_document(args, ctx, stamp, info, results, scenarios, problems, run)
    out = args.json_out or RESULTS_DIR / f"proxy_overhead-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {out}")
    if run.interrupted:
        return 130
    return 1 if problems else 0


def pinning(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The gateway's core and the load's, or (None, None) when not pinning."""
    ncpu = len(os.sched_getaffinity(0))
    if args.no_pin or ncpu < 2:
        if not args.no_pin:
            print(f"warning: only {ncpu} CPU(s) usable: not pinning", file=sys.stderr)
        return None, None
    return args.gateway_cpu, args.load_cpu


def print_header(ctx: Ctx, info: dict[str, Any], scenarios: list[str]) -> None:
    args = ctx.args
    print("Bastion proxy overhead benchmark")
    for key in ("nginx", "wrk", "litellm", "bastion", "python", "cpu", "cpus", "kernel"):
        if key in info:
            print(f"  {key:<8} {info[key]}")
    pin = (
        "no pinning"
        if ctx.gateway_cpu is None
        else f"gateway on CPU {ctx.gateway_cpu}; wrk + static upstream on CPU {ctx.load_cpu}"
    )
    print(
        f"  run      {args.duration}s per measurement, {args.warmup}s warm-up,"
        f" c=1 and c={args.connections}, rounds={args.rounds}"
        f"{' (interleaved: targets started once)' if args.interleave else ''},"
        f" scenarios={scenarios}; {pin}"
    )
    print(f"  workdir  {ctx.workdir}")
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(
            f"  WARNING: load average is {load1:.2f} before the run: something else is using"
            " the CPUs, expect noisy numbers (see --rounds)"
        )


def measure_all(ctx: Ctx, scenarios: list[str], run: Run) -> bool:
    """Every round of every target into ``run``; False if the static upstream would not
    start. Ctrl-C (or SIGTERM) ends the run early, keeping what was measured."""
    args = ctx.args
    try:
        try:
            upstream = start_upstream(ctx)
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"!!! could not start the static upstream: {exc}", file=sys.stderr)
            return False
        print(f"  static upstream: JSON on :{ctx.json_port}, SSE on :{ctx.sse_port}")
        live: dict[str, Target] = {}  # --interleave: started once, measured every round
        for rnd in range(args.rounds):
            for name in args.target_list:
                if name in run.status:  # skipped or failed in an earlier round
                    continue
                print(f"\n[{name}] round {rnd + 1}/{args.rounds}", flush=True)
                measure_one(ctx, name, live, scenarios, run)
                if not upstream.alive():
                    raise RuntimeError(f"static upstream died; log:\n{upstream.log_tail()}")
            if args.shared_core:
                measure_shared_round(ctx, live, run.rounds, run.status, scenarios)
    except KeyboardInterrupt:
        run.interrupted = True
        print("\ninterrupted: stopping everything", file=sys.stderr)
    return True


def measure_one(
    ctx: Ctx, name: str, live: dict[str, Target], scenarios: list[str], run: Run
) -> None:
    """One round of one target: started unless it lives on (--interleave), measured, then
    stopped unless it lives on; a skip or a failure is noted in ``run.status``."""
    args = ctx.args
    target: Target | None = live.get(name)
    first = target is None
    try:
        if target is None:
            t0 = time.monotonic()
            target = STARTERS[name](ctx)
            if target.procs:
                print(f"  started in {time.monotonic() - t0:.1f}s", flush=True)
            if target.info:
                run.setup[name] = target.info
            if args.interleave:
                live[name] = target
        # --shared-core: the proxies' high concurrency comes after the round.
        levels = (1,) if args.shared_core and target.procs else None
        run.rounds[name].append(measure_target(ctx, target, scenarios, first, levels))
    except SkipTarget as exc:
        print(f"  SKIPPED {name}: {exc}", flush=True)
        run.status[name] = {"skipped": str(exc)}
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"  !!! {name} FAILED: {exc}", flush=True)
        run.status[name] = {"error": str(exc)}
    finally:
        if target is not None and (not args.interleave or name in run.status):
            live.pop(name, None)
            for proc in target.procs:
                ctx.processes.stop(proc)


def collect(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """Each target's rounds combined (medians), or why it has none."""
    results: dict[str, Any] = {}
    for name in args.target_list:
        rounds, status = run.rounds[name], run.status.get(name)
        if status is not None and not rounds:
            results[name] = status
        elif rounds:
            results[name] = combine_rounds(rounds, args.connections)
            if status is not None:
                results[name]["error"] = status.get("error", "")
        elif run.interrupted:
            results[name] = {"skipped": "not measured (interrupted)"}
        if name in run.setup and name in results:
            results[name]["setup"] = run.setup[name]
    return results


def print_report(args: argparse.Namespace, results: dict[str, Any]) -> list[str]:
    """The tables and verdicts; returns the run's problems (errors, failed targets)."""
    title_rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    if args.shared_core:
        title_rounds += (
            f"; the proxies' c={args.connections} measured all at once on one core"
            " (--shared-core): each rps@32 is a share of that core, compare ratios"
        )
    print_tables(
        results,
        "chat",
        args.connections,
        f"Non-streaming chat completions ({args.duration}s each{title_rounds})",
    )
    if args.stream:
        print_tables(
            results,
            "stream",
            args.connections,
            f"Streaming chat completions, stream: true, full SSE body ({args.duration}s each"
            f"{title_rounds})",
        )
    shown = [t for t in VERDICT_TARGETS if t in args.target_list]
    if shown:
        print()
        print("Verdict (non-streaming), against direct and LiteLLM:")
        for t in shown:
            print_verdict(verdict(results, args.connections, t), args.connections)
    if CHAIN_BASE in args.target_list and any(t in args.target_list for t in CHAIN_VARIANTS):
        print()
        print_chain_verdict(chain_verdict(results, args.connections), args.connections)
    features = feature_verdict(results, args.connections)
    if features:
        print()
        print_feature_verdict(features, args.connections, args.shared_core)
    problems = run_problems(results, args.connections)
    if problems:
        print("\n!!! PROBLEMS IN THIS RUN (numbers of the affected targets are not trustworthy):")
        for line in problems:
            print(f"!!!   {line}"[:300])
    return problems


def run_problems(results: dict[str, Any], conns: int) -> list[str]:
    """Measurements with errors, then targets and scenarios that failed."""
    flagged = [
        f"{t}/{s}/{k}: {r['error_total']} errors ({error_str(r['errors'])})"
        for t in results
        for s in SCENARIOS
        for k in ("c1", f"c{conns}")
        if (r := get(results, t, s, k)) and r["error_total"]
    ]
    failed = [
        f"{t}: {e['error'].splitlines()[0]} (details above)"
        for t, e in results.items()
        if e.get("error")
    ]
    failed += [
        f"{t}/{s}: {results[t][s]['error']}"
        for t in results
        for s in SCENARIOS
        if isinstance(results[t].get(s), dict) and "error" in results[t][s]
    ]
    return flagged + failed


def results_document(
    args: argparse.Namespace,
    ctx: Ctx,
    stamp: str,
    info: dict[str, Any],
    results: dict[str, Any],
    scenarios: list[str],
    problems: list[str],
    run: Run,
) -> dict[str, Any]:
    """The results file's content (bench/results/proxy_overhead-<stamp>.json)."""
    conns = args.connections
    verdicts = {t: verdict(results, conns, t) for t in VERDICT_TARGETS}
    return {
        "benchmark": "proxy_overhead",
        "timestamp": stamp,
        "interrupted": run.interrupted,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": [1, conns],
            "rounds": args.rounds,
            "interleave": args.interleave,
            "shared_core": args.shared_core,
            "targets": args.target_list,
            "scenarios": scenarios,
            "gateway_cpu": ctx.gateway_cpu,
            "load_cpu": ctx.load_cpu,
            "wrk_threads": 1,
            "wrk_timeout_s": args.wrk_timeout,
            "request_body": json.loads(request_body(MODEL_JSON, False)),
        },
        "environment": info,
        "results": results,
        "derived": {s: derive(results, s, conns) for s in scenarios},
        "access_chain": {s: access_chain(results, s, conns) for s in scenarios},
        "feature_costs": {s: feature_costs(results, s, conns) for s in scenarios},
        "feature_base": FEATURE_BASE,
        "verdict": verdicts["bastion"],
        "verdict_secure": verdicts["bastion-secure"],
        "verdict_access_chain": chain_verdict(results, conns),
        "verdict_features": feature_verdict(results, conns),
        "problems": problems,
    }
