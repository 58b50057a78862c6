"""The benchmark's options (``bench/proxy_overhead.py --help``) and the tools it needs."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.overhead.bastion import PRIVATE_REDIS
from bench.overhead.catalog import ALL_TARGETS, DEFAULT_TARGETS, FEATURE_OFF
from bench.overhead.paths import LITELLM_VENV


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure the latency/throughput a gateway adds over a static upstream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="3 s per measurement, 1 s warm-up")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds per target/scenario")
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (the last"
        f" {len(FEATURE_OFF)}: the default chain with one feature off, to measure its cost)",
    )
    p.add_argument("--connections", type=int, default=32, help="the high concurrency level")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure stream: true requests (secondary table)",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat everything; report medians")
    p.add_argument(
        "--shared-core",
        action="store_true",
        help="measure the proxies' high concurrency all at once, every proxy's servers on"
        " the gateway core (one wrk each): the throughputs then compare CPU cost per request"
        " in the same seconds; implies --interleave (c=1 stays one target at a time)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start every target once and keep it up: each round measures each target in"
        " turn on the same servers (warm-up in the first round only), so a slow spell of the"
        " machine hits every target alike; use with many short rounds",
    )
    p.add_argument("--gateway-cpu", type=int, default=0, help="core for the proxy under test")
    p.add_argument("--load-cpu", type=int, default=1, help="core for wrk and the static upstream")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--wrk-timeout", type=int, default=30, help="wrk per-request timeout, s")
    p.add_argument(
        "--startup-timeout", type=float, default=180, help="seconds to wait for a server"
    )
    p.add_argument(
        "--json-out", type=Path, default=None, help="results file (default bench/results/)"
    )
    p.add_argument(
        "--litellm-venv", type=Path, default=LITELLM_VENV, help="venv made by setup_litellm.sh"
    )
    p.add_argument(
        "--bastion-extra",
        type=json.loads,
        default={},
        metavar="JSON",
        help="merged into the generated config of every Bastion variant,"
        ' e.g. \'{"server": {"upstream_transport": "aiohttp"}}\'',
    )
    p.add_argument(
        "--redis-url",
        default=PRIVATE_REDIS,
        help="Redis for bastion-secure's rate limits: 'private' (default) starts a"
        " redis-server of the run's own, pinned to the load core; or a running one's URL",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of the run")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3, 1
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        p.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.target_list = [t for t in ALL_TARGETS if t in targets]  # fixed order
    if args.shared_core:
        args.interleave = True
    if args.duration < 1 or args.rounds < 1 or args.connections < 2:
        p.error("--duration and --rounds must be >= 1, --connections >= 2")
    return args


def check_tools(args: argparse.Namespace) -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if not args.no_pin and shutil.which("taskset") is None:
        missing.append("taskset")
    if missing:
        sys.exit(
            f"proxy_overhead: missing {', '.join(missing)}; install with "
            "`apt-get install -y nginx wrk util-linux` (do not start the nginx service)"
        )
