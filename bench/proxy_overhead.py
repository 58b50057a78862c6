#!/usr/bin/env python3
"""Proxy overhead benchmark: Bastion vs. a plain nginx reverse proxy vs. LiteLLM's proxy.

Run by hand (not by CI), from the repository root:

    .venv/bin/python bench/proxy_overhead.py                 # everything, 10 s per measurement
    .venv/bin/python bench/proxy_overhead.py --quick         # 3 s per measurement
    .venv/bin/python bench/proxy_overhead.py --targets direct,nginx,bastion --no-stream

Every target forwards to the same static upstream (nginx answering fixed OpenAI-shaped
bodies as fast as it can), so what is measured is the cost of the proxy itself. The gateway
under test is pinned to one core, wrk and the static upstream to the other. All numbers are
measured in this run; nothing is hard-coded. See bench/README.md.

Bastion runs three times: bare (no auth, no rate limits), as deployed on plain HTTP (key
check, in-memory rate limits) and with the whole access chain (TLS, key check, model
allow-lists, rate limits in Redis); the difference to the bare one is the access chain's cost.
Two more variants, on request (--targets), are that default chain with one feature off:
bastion-secure-no-telemetry (logging.access_log: false; metrics cannot be turned off) and
bastion-secure-no-guards (guards.enabled: false); the difference is that feature's cost.

On a noisy machine, `--shared-core` measures the proxies' high concurrency all at once on
the gateway core, so that the machine's slow spells hit them alike and their throughput
ratio is their cost ratio; every measurement also reports the proxy's CPU time per request.

Needs: nginx and wrk on PATH (apt-get install nginx wrk), taskset (util-linux), for the
LiteLLM target bench/.venv-litellm (bash bench/setup_litellm.sh), for bastion-secure
redis-server on PATH (or a running Redis at --redis-url) and trustme (a dev dependency of the
project). Run it with the project's virtualenv: the code lives in bench/overhead/ (one job
per module) and reuses tests/support.py's process helpers.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python bench/proxy_overhead.py`): the repository root makes the
# bench.overhead and tests.support packages importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.overhead.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
