"""What does the access chain cost, counted in CPU instructions instead of timed?

On a noisy machine a 20 % throughput target drowns in the spread between rounds (the
proxy benchmark's rounds of the same target differ by up to half). Instructions executed
do not depend on what else runs, so this counts them: each variant serves N requests in
one process under valgrind's callgrind, then N2, and the difference divided by N2 - N is
its instructions per request, start-up excluded. Everything is in process: uvicorn's
httptools protocol as `bastion serve` runs it (gateway.listener.ListenerProtocol) over a
socket that only records what is written, the whole BastionApp, and an upstream that
answers a fixed chat completion at no cost (bench/gateway_hotpath.py). So what is counted
is the gateway's own code per request, HTTP parsing and writing included; not counted:
the kernel, TLS (a fake socket cannot carry it) and, for Redis, the server's side.

    apt-get install -y valgrind
    .venv/bin/python bench/chain_instructions.py [--requests 200,700] [--redis-url URL]
        [--concurrency 32] [--sockets]

With ``--sockets`` each variant is served as ``bastion serve`` serves it: uvicorn on a TCP
port (uvloop, gateway.listener.ListenerProtocol), the gateway's own upstream client to an
upstream that answers a fixed chat completion, and a fourth variant, ``bastion-secure``,
the whole access chain of the proxy benchmark's: TLS on the listener (a trustme
certificate), API key with model allow-lists, rate limits in Redis. The load (connections
kept open, so no handshake is counted) and the upstream run in a child process valgrind
does not follow. Still not counted: the kernel, Redis's side. Counts over sockets vary a
little more from run to run (about 3 %: how many requests one turn of the loop serves
depends on timing).

With ``--concurrency K`` there are K connections, and each turn hands every one of them a
request before waiting for the answers, as wrk's K connections do: what a load of K
requests in flight costs (the Redis checks of one turn share a write, the collector sees
K requests' objects alive at once).

Variants: ``bare`` (dev, no auth, no rate limits), ``bastion`` (API key, in-memory rate
limits that never throttle, x-ratelimit headers) and ``bastion-redis`` (API key, model
allow-lists for the role and the key, rate limits in Redis); each variant's cost is
``1 - bare / variant``, the share of throughput it costs a CPU-bound gateway. About
3 minutes, two variants at a time. Instruction counts are not time (a cache miss costs
more than an add): compare them with proxy_overhead.py's figures, not instead of them.

What a feature costs, per request: any variant name may end in switches that turn a
feature off, ``-guards-off`` (``guards.enabled: false``) and ``-no-telemetry``
(``logging.access_log: false``; the metrics sink has no setting that turns it off, so it
stays), e.g. ``--variants bastion,bastion-guards-off,bastion-no-telemetry``; each is
then also printed against its variant with the feature on. ``--settings JSON`` is merged
into every variant's settings. ``--logging`` configures logging as ``bastion serve``
does (ECS JSON on stderr), so that the access log's lines are really formatted and
written (without it the ``bastion.access`` logger is below its level and the sink's
thread drops what it drains). ``--multiprocess-metrics`` runs the counted process with
``PROMETHEUS_MULTIPROC_DIR`` set, as a worker of ``bastion serve --workers N``: every
observation is then a write into a memory-mapped file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Run as a script: the repository root makes the bench.chain package importable (the
# counted process gets it through PYTHONPATH, see count()).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.chain.serving import (  # noqa: E402
    LOGGING_ENV,
    load_and_upstream,
    serve,
    serve_over_sockets,
)
from bench.chain.variants import SOCKET_VARIANTS, SWITCHES, VARIANTS, split_variant  # noqa: E402

# Callgrind runs the gateway 35-50 times slower than it runs at full speed. The gateway's
# timers that decide how much work a request costs are stretched by this much in the
# counted process, so that they fire as often per request as they do at full speed: a
# non-streamed answer is watched for a client going away once it has taken 50 ms
# (gateway.proxy), which at full speed only a slow upstream makes it take, but under
# callgrind every answer of a turn of 32 did (the watch, a task, then counted ~10 % of a
# request, and more or less of it depending on the machine's load); rate-limit
# corrections go to Redis every 0.25 s (gateway.ratelimit), once per ~1,000 requests at
# full speed, once per 6 under callgrind; the access log's writer thread wakes every
# 50 ms (monitors.access_log), once per ~100 requests at full speed, once per one or two
# under callgrind.
TIME_STRETCH = 50


def count(
    variant: str,
    requests: int,
    redis_url: str,
    concurrency: int,
    sockets: bool,
    options: argparse.Namespace,
) -> int:
    """Instructions executed by a whole process serving ``requests`` requests."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])])
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env[LOGGING_ENV] = "1" if options.logging else "0"
    with tempfile.TemporaryDirectory() as tmp:
        if options.multiprocess_metrics:
            # Set before the counted process imports prometheus_client (it decides then).
            metrics_dir = Path(tmp) / "metrics"
            metrics_dir.mkdir(mode=0o700)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/callgrind.out",
                sys.executable,
                __file__,
                "--serve",
                variant,
                str(requests),
                "--redis-url",
                redis_url,
                "--concurrency",
                str(concurrency),
                "--settings",
                json.dumps(options.settings),
                *(["--sockets"] if sockets else []),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{variant} ({requests} requests) failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="200,700", help="N,N2: requests per count")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--variants", help="default: all (bastion-secure with --sockets)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once, each on a connection of its own (wrk's -c)",
    )
    parser.add_argument(
        "--sockets",
        action="store_true",
        help="serve over TCP as `bastion serve` does (uvicorn, TLS, the upstream client);"
        " adds the bastion-secure variant",
    )
    parser.add_argument(
        "--settings",
        type=json.loads,
        default={},
        metavar="JSON",
        help='merged into every variant\'s settings, e.g. \'{"audit": {"enabled": true}}\'',
    )
    parser.add_argument(
        "--logging",
        action="store_true",
        help="configure logging as `bastion serve` does (the access log's lines written)",
    )
    parser.add_argument(
        "--multiprocess-metrics",
        action="store_true",
        help="metrics in prometheus_client's multiprocess mode (memory-mapped files), as"
        " under `bastion serve --workers N`",
    )
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, metavar=("N", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(load_and_upstream(int(args.client[0]), int(args.client[1])))
        return
    if args.serve:
        import uvloop

        import gateway.proxy
        import gateway.ratelimit
        from monitors.access_log import AccessLogSink

        gateway.proxy.WATCH_DISCONNECT_AFTER_S *= TIME_STRETCH
        gateway.ratelimit.FLUSH_EVERY_S *= TIME_STRETCH
        # A keyword-only default of the sink's constructor (gateway.app passes none).
        access_log_defaults = AccessLogSink.__init__.__kwdefaults__
        assert access_log_defaults is not None
        access_log_defaults["interval_s"] *= TIME_STRETCH

        served = serve_over_sockets if args.sockets else serve
        variant, n = args.serve[0], int(args.serve[1])
        uvloop.run(served(variant, n, args.redis_url, args.concurrency, args.settings))
        return
    if shutil.which("valgrind") is None:
        sys.exit("chain_instructions: valgrind is missing (apt-get install -y valgrind)")
    # Whole turns only: each turn serves one request per connection.
    low, high = (int(n) // args.concurrency * args.concurrency for n in args.requests.split(","))
    variants = (args.variants or ",".join(SOCKET_VARIANTS if args.sockets else VARIANTS)).split(",")
    try:
        bases = {split_variant(v)[0] for v in variants}
    except ValueError as exc:
        sys.exit(f"chain_instructions: {exc}")
    if "bastion-secure" in bases and not args.sockets:
        sys.exit("chain_instructions: bastion-secure (TLS) needs --sockets")
    jobs = [(v, n) for v in variants for n in (low, high)]
    print(f"counting {len(jobs)} processes under callgrind, two at a time...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = pool.map(
            lambda job: count(job[0], job[1], args.redis_url, args.concurrency, args.sockets, args),
            jobs,
        )
        totals = dict(zip(jobs, counted, strict=True))
    per_request = {v: (totals[v, high] - totals[v, low]) / (high - low) for v in variants}
    how = "over sockets" if args.sockets else "in process, no TLS"
    how += ", logging as `bastion serve`" if args.logging else ""
    how += ", multiprocess metrics" if args.multiprocess_metrics else ""
    how += f", --settings {json.dumps(args.settings)}" if args.settings else ""
    print(
        f"\ninstructions per request (({high} - {low}) requests, {args.concurrency} at a time,"
        f" {how})"
    )
    width = max(14, *(len(v) for v in variants))
    base = per_request.get("bare")
    for variant, instructions in per_request.items():
        cost = ""
        if base and variant != "bare":
            cost = f"+{instructions - base:,.0f}  cost {1 - base / instructions:.1%}"
        print(f"  {variant:<{width}} {instructions:>10,.0f}  {cost}")
    features = feature_costs(per_request)
    if features:
        print("\nwhat the switched-off features cost: the variant with them on minus without")
        for pair, (with_on, added, share) in features.items():
            print(f"  {pair}: {added:+,.0f} instructions/request ({share:.1%} of {with_on}'s)")
    print(json.dumps({"instructions_per_request": per_request, "feature_costs": features}))


def feature_costs(per_request: dict[str, float]) -> dict[str, tuple[str, float, float]]:
    """For each measured variant with a feature switched off (``bastion-guards-off``) and
    the same variant with that one feature on (``bastion``) measured too: that variant,
    the instructions the feature adds per request, and their share of that variant's.
    Keyed ``"with - without"``; a variant with two switches pairs with each one-switch
    variant that was measured."""
    out: dict[str, tuple[str, float, float]] = {}
    for without, instructions in per_request.items():
        for suffix in SWITCHES:
            with_on = without.replace(suffix, "", 1)
            on = per_request.get(with_on)
            if with_on == without or not on:
                continue
            out[f"{with_on} - {without}"] = (with_on, on - instructions, 1 - instructions / on)
    return out


if __name__ == "__main__":
    main()
