#!/usr/bin/env bash
# Sets up .venv with the test dependencies and runs the whole test suite.
# GPU tests are marked and skip themselves where CUDA is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/python -m pytest -q "$@"
# vLLM integration tests: a second step, in their own cached venv (scripts/setup_vllm.sh),
# so the core suite stays fast and vLLM's pins never touch .venv. Only for a full run
# (no pytest arguments); KVTIERD_SKIP_VLLM=1 skips it.
if [ $# -eq 0 ] && [ "${KVTIERD_SKIP_VLLM:-0}" != 1 ]; then
    VPY=$(scripts/setup_vllm.sh | tail -n 1)
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    "$VPY" -m pytest -q -p no:cacheprovider --basetemp "$TMP/pytest" tests/vllm
fi
# The engine-less harness on the newest vLLM (0.33: no CPU kernels, so no engine): its real
# Scheduler, connector factory and KV cache tensors, in their own cached venv
# (scripts/setup_vllm033.sh). Only for a full run; KVTIERD_SKIP_VLLM033=1 skips it.
if [ $# -eq 0 ] && [ "${KVTIERD_SKIP_VLLM033:-0}" != 1 ]; then
    VPY33=$(scripts/setup_vllm033.sh | tail -n 1)
    TMP33=$(mktemp -d)
    trap 'rm -rf "${TMP:-}" "$TMP33"' EXIT
    "$VPY33" -m pytest -q -p no:cacheprovider --basetemp "$TMP33/pytest" tests/vllm033
fi
