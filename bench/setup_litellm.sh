#!/usr/bin/env bash
# Create bench/.venv-litellm with LiteLLM's proxy, for bench/proxy_overhead.py.
#
# Idempotent: if the venv already imports litellm and has the proxy CLI, it does nothing.
# Usage:  bash bench/setup_litellm.sh            (LITELLM_SPEC overrides the pip spec)
#         PYTHON=python3.11 bash bench/setup_litellm.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-litellm"
spec="${LITELLM_SPEC:-litellm[proxy]}"
python="${PYTHON:-}"
# Importing litellm fetches a cost map from the internet unless told not to.
export LITELLM_LOCAL_MODEL_COST_MAP=True

if [[ -x "$venv/bin/python" && -x "$venv/bin/litellm" ]] \
    && "$venv/bin/python" -c 'import litellm, litellm.proxy.proxy_server' >/dev/null 2>&1; then
    echo "setup_litellm: $venv already works ($("$venv/bin/python" -m pip show litellm 2>/dev/null \
        | awk '/^Version:/ {print "litellm " $2}'))"
    exit 0
fi

if [[ -z "$python" ]]; then
    # Prefer the interpreter of the project venv (3.11); fall back to whatever python3 is.
    if [[ -x "$here/../.venv/bin/python" ]]; then
        python="$(readlink -f "$here/../.venv/bin/python")"
    else
        python="python3"
    fi
fi

echo "setup_litellm: creating $venv with $("$python" -V 2>&1)"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# No torch/CUDA: litellm[proxy] does not need them; refuse quietly growing into them.
"$venv/bin/python" -m pip install --quiet "$spec"

if "$venv/bin/python" -m pip show torch >/dev/null 2>&1; then
    echo "setup_litellm: WARNING: torch got installed into $venv (unexpected)" >&2
fi
"$venv/bin/python" -c 'import litellm, litellm.proxy.proxy_server' >/dev/null
echo "setup_litellm: done: $("$venv/bin/python" -m pip show litellm | awk '/^Version:/ {print "litellm " $2}')," \
    "$(du -sh "$venv" | cut -f1) on disk"
