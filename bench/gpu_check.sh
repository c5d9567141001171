#!/bin/bash
# One device call: GPU tests, the CPU fallback tests, bench/gpu.py, then time to first token of the
# Llama-3-8B shape from the host tier (layer-wise, whole-first, plain-copy reference) and from HBM.
# Logs go to $OUT (or /tmp); the bench table is printed last.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvtierd-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/device.txt"
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/gpu tests/test_paged_copy.py \
    tests/test_transformers_integration.py 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "pytest rc=${PIPESTATUS[0]}"
timeout 240 python3 bench/gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
timeout 200 python3 bench/ttft.py --model 8b --lengths 8192,16384 --reps 3 --disk-restarts 0 2>&1 | tee "$OUT/ttft_host.log"
echo "ttft host rc=${PIPESTATUS[0]}"
timeout 200 python3 bench/ttft.py --model 8b --lengths 8192,16384 --reps 3 --disk-restarts 0 --tier hbm \
    --hbm-bytes 8GiB 2>&1 | tee "$OUT/ttft_hbm.log"
echo "ttft hbm rc=${PIPESTATUS[0]}"
