#!/usr/bin/env bash
# Creates .venv and installs kvtierd into it (editable). Usage:
#   scripts/setup.sh            the daemon and client only (no GPU, no torch)
#   scripts/setup.sh test       plus what the test suite needs (CPU torch, transformers, redis-server)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "${1:-}" = "test" ]; then
    # torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test,transformers]"
    if ! command -v redis-server >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
        else
            echo "note: redis-server is not installed; tests that compare with Redis will be skipped" >&2
        fi
    fi
else
    .venv/bin/python -m pip install -q -e .
fi
echo "kvtierd installed in .venv ($(.venv/bin/kvtierd --version))"
