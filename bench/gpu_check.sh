#!/bin/bash
# One device call: GPU tests, the CPU fallback tests, then bench/gpu.py.
# Logs go to $OUT (or /tmp); the bench table is printed last.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvtierd-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/device.txt"
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/gpu tests/test_paged_copy.py 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "pytest rc=${PIPESTATUS[0]}"
timeout 240 python3 bench/gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
