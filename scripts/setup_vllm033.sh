#!/usr/bin/env bash
# Creates (or reuses) the venv of the engine-less vLLM 0.33 harness (tests/vllm033/).
# vLLM 0.33 has no CPU build and pins a torch this machine does not have, so it is installed
# with --no-deps onto the CPU torch, plus only the pure-Python packages that its config,
# Scheduler, connector factory and KV cache allocation import (found by trying the imports),
# at the versions vLLM's own metadata asks for. Cached per version like scripts/setup_vllm.sh
# (a cold build takes about 3 minutes). Prints the venv's python path on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.33.0
TORCH_VERSION=2.13.0     # CPU wheel; vLLM 0.33 asks for 2.14, which its Scheduler path does not need
VENV=${KVTIERD_VLLM033_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtierd/vllm-venv-$VLLM_VERSION}
PY=${PYTHON:-python3}
# The imports of the harness's path, as distribution names; versions come from vLLM's metadata.
DEPS="packaging pydantic regex numpy cbor2 psutil pyzmq urllib3 transformers aiohttp requests openai-harmony
openai pillow pybase64 cachetools msgspec cloudpickle uvloop py-cpuinfo prometheus-client xgrammar fastapi
partial-json-parser llguidance einops"
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    # torch first and pinned: otherwise a requirement could pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install -q --no-deps "vllm==$VLLM_VERSION"
    REQS=$("$VENV/bin/python" - $DEPS <<'PY'
import importlib.metadata as md, re, sys
want = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1:]}
out = {}
for r in md.requires("vllm") or []:
    if "extra ==" in r:
        continue
    m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)", r)
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    if name in want:
        out[name] = name + m.group(3).replace(" ", "")      # vLLM's version bounds, without extras
for n in sorted(want - out.keys()):
    out[n] = n
print("\n".join(out.values()))
PY
)
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $REQS pytest 2>&1 | grep -v "dependency resolver\|requires\|ignored" >&2 || true
    "$VENV/bin/python" -c "import vllm.v1.core.sched.scheduler, vllm.v1.worker.utils, transformers" >/dev/null
    touch "$VENV/.complete"
fi
# --no-deps: kvtierd's own small dependencies are installed next; do not let pip move vLLM's packages.
"$VENV/bin/python" -m pip install -q --no-deps -e . >/dev/null
"$VENV/bin/python" -m pip install -q msgpack xxhash prometheus-client uvloop numpy >/dev/null 2>&1
echo "$VENV/bin/python"
