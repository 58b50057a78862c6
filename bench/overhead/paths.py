"""Where the benchmark's files are, and what it sends as the API key."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
PROJECT_VENV = REPO_ROOT / ".venv"
WRK_SCRIPT = BENCH_DIR / "wrk_chat.lua"
UPSTREAM_TEMPLATE = BENCH_DIR / "nginx_upstream.conf.in"
PROXY_TEMPLATE = BENCH_DIR / "nginx_proxy.conf.in"

# LiteLLM's master key, also sent to direct/nginx (ignored); Bastion gets a key of its own
# when its auth is on (see bench.overhead.bastion.start_bastion).
API_KEY = "sk-bench-master-key-0123456789"
