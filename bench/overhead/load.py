"""The load: a preflight request, wrk runs and their parsing, one target or all at once.

wrk (one thread, pinned to the load core) runs bench/wrk_chat.lua, which prints one
``BENCH_RESULT {json}`` line; with the proxy's processes given, the proxy's CPU time per
request is read from /proc around the run (bench.overhead.cpu).
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.overhead.bodies import ANSWER, request_body
from bench.overhead.cpu import process_group_cpu_s
from bench.overhead.paths import WRK_SCRIPT
from bench.overhead.processes import Proc, http_request, pin_prefix
from bench.overhead.targets import Ctx, Endpoint, Target


def preflight(endpoint: Endpoint, stream: bool) -> str | None:
    """Send one request; None if the answer is a correct chat completion, else the problem."""
    try:
        status, headers, data = http_request(
            "127.0.0.1",
            endpoint.port,
            "POST",
            endpoint.path,
            request_body(endpoint.model, stream),
            timeout=30,
            api_key=endpoint.api_key,
            tls=endpoint.tls,
        )
    except OSError as exc:
        return f"request failed: {type(exc).__name__}: {exc}"
    text = data.decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {text[:300]}"
    try:
        if not stream:
            obj = json.loads(text)
            content = obj["choices"][0]["message"]["content"]
            if content != ANSWER:
                return f"unexpected content {content!r}"
            return None
        ctype = headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            return f"content-type {ctype!r} is not text/event-stream"
        pieces: list[str] = []
        done = False
        for line in text.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                return f"error event: {payload[:300]}"
            for choice in event.get("choices", []):
                pieces.append((choice.get("delta") or {}).get("content") or "")
        if not done:
            return f"stream did not end with [DONE]: {text[-300:]!r}"
        if "".join(pieces) != ANSWER:
            return f"streamed content differs: {''.join(pieces)!r}"
        return None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"malformed answer ({type(exc).__name__}: {exc}): {text[:300]!r}"


def run_wrk(
    ctx: Ctx,
    endpoint: Endpoint,
    stream: bool,
    connections: int,
    duration_s: int,
    procs: list[Proc] | None = None,
) -> dict[str, Any]:
    """One wrk measurement; with `procs` (the proxy's servers, each the leader of its
    process group) also the CPU time the proxy spent per request while it ran."""
    env = dict(os.environ)
    env["BENCH_BODY"] = request_body(endpoint.model, stream)
    env["BENCH_API_KEY"] = endpoint.api_key
    cmd = [
        *pin_prefix(ctx.load_cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={ctx.args.wrk_timeout}s",
        "-s",
        str(WRK_SCRIPT),
        endpoint.url,
    ]
    load_before = os.getloadavg()[0]
    pgids = {p.popen.pid for p in procs or ()}
    cpu_before = process_group_cpu_s(pgids) if pgids else 0.0
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=duration_s + ctx.args.wrk_timeout + 60
    )
    cpu_s = process_group_cpu_s(pgids) - cpu_before if pgids else None
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed (status {proc.returncode}): {proc.stderr.strip()} {proc.stdout.strip()}"
        )
    raw = json.loads(line.split(" ", 1)[1])
    secs = raw["duration_us"] / 1e6
    errors = raw["errors"]
    n_err = sum(errors.values())
    lat = {k: v / 1000.0 for k, v in raw["latency_us"].items()}  # ms
    return {
        "connections": connections,
        "duration_s": round(secs, 3),
        "requests": raw["requests"],
        "rps": raw["requests"] / secs if secs else 0.0,
        "ok_rps": (raw["requests"] - errors["status"]) / secs if secs else 0.0,
        "bytes": raw["bytes"],
        "errors": errors,
        "error_total": n_err,
        "latency_ms": lat,
        "loadavg_1m_before": load_before,
        # The proxy's CPU time per answered request: at the high concurrency the proxy is
        # CPU-bound, so this is the inverse of its throughput without the idle gaps.
        "cpu_s": cpu_s,
        "cpu_us_per_request": cpu_s / raw["requests"] * 1e6
        if cpu_s is not None and raw["requests"]
        else None,
    }


def print_run(name: str, scenario: str, r: dict[str, Any], how: str = "") -> None:
    lat = r["latency_ms"]
    flag = f"  !!! {r['error_total']} ERRORS {r['errors']}" if r["error_total"] else ""
    cpu = r["cpu_us_per_request"]
    cpu_note = "" if cpu is None else f", CPU {cpu:.1f} us/request"
    print(
        f"  {name}/{scenario} c={r['connections']}{how}: {r['rps']:.1f} rps,"
        f" p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms{cpu_note}{flag}",
        flush=True,
    )


def measure_target(
    ctx: Ctx,
    target: Target,
    scenarios: list[str],
    first: bool = True,
    levels: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Every scenario of one target at c=1 and at the high concurrency (or at `levels`).
    `first`: the target was just started (preflight, setup check and warm-up); later
    rounds of --interleave measure the same running servers again."""
    args = ctx.args
    levels = levels or (1, args.connections)
    out: dict[str, Any] = {}
    verify = target.verify if first else None
    for scenario in scenarios:
        stream = scenario == "stream"
        endpoint = target.stream if stream else target.chat
        problem = preflight(endpoint, stream) if first else None
        if problem:
            print(f"  !!! {target.name}/{scenario}: preflight FAILED: {problem}", flush=True)
            out[scenario] = {"error": f"preflight failed: {problem}"}
            continue
        if verify is not None:
            problem, verify = verify(), None
            if problem:
                raise RuntimeError(f"{target.name} is not set up as intended: {problem}")
        if first and args.warmup > 0:
            warm = run_wrk(ctx, endpoint, stream, args.connections, args.warmup)
            print(
                f"  {target.name}/{scenario}: warm-up {warm['requests']} requests"
                f" ({warm['rps']:.0f} rps, {warm['error_total']} errors)",
                flush=True,
            )
        res: dict[str, Any] = {}
        for conns in levels:
            r = run_wrk(ctx, endpoint, stream, conns, args.duration, target.procs)
            res[f"c{conns}"] = r
            print_run(target.name, scenario, r)
        out[scenario] = res
    return out


def measure_together(
    ctx: Ctx, targets: list[Target], scenario: str
) -> dict[str, dict[str, Any] | Exception]:
    """--shared-core: the high concurrency on every target at once, one wrk each.

    The targets' servers share the gateway core, so each gets about an equal share of it
    and a slow spell of the machine hits all of them in the same seconds: the ratio of
    their throughputs is the ratio of their CPU costs per request, and it holds still
    where measurements taken one after the other drift apart."""
    stream = scenario == "stream"

    def one(target: Target) -> dict[str, Any] | Exception:
        endpoint = target.stream if stream else target.chat
        try:
            return run_wrk(
                ctx, endpoint, stream, ctx.args.connections, ctx.args.duration, target.procs
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return dict(zip((t.name for t in targets), pool.map(one, targets), strict=True))


def measure_shared_round(
    ctx: Ctx,
    live: dict[str, Target],
    rounds: dict[str, list[dict[str, Any]]],
    status: dict[str, dict[str, str]],
    scenarios: list[str],
) -> None:
    """--shared-core: this round's high-concurrency figures of every live proxy, taken
    together (measure_together) and filed into the round measure_target began."""
    hi = f"c{ctx.args.connections}"
    for scenario in scenarios:
        group = [
            t
            for name, t in live.items()
            if t.procs
            and name not in status
            and rounds[name]
            and "error" not in rounds[name][-1].get(scenario, {"error": ""})
        ]
        if not group:
            continue
        names = ", ".join(t.name for t in group)
        print(f"\n[{names}] c={ctx.args.connections} at once, sharing one core", flush=True)
        for name, r in measure_together(ctx, group, scenario).items():
            if isinstance(r, Exception):
                print(f"  !!! {name} FAILED: {r}", flush=True)
                status[name] = {"error": str(r)}
                rounds[name].pop()  # this round has no high-concurrency figure
                for proc in live.pop(name).procs:
                    ctx.processes.stop(proc)
                continue
            rounds[name][-1][scenario][hi] = r
            print_run(name, scenario, r, " (shared core)")
