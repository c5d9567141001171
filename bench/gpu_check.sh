#!/bin/bash
# One device call: GPU tests, the CPU fallback tests, bench/gpu.py, then time to first token of the
# Llama-3-8B shape from the host tier (layer-wise, whole-first, plain-copy reference) and from HBM.
# Sized for one device call of at most 600 s (step timeouts 150 + 150 + 140 + 140 s); logs go to $OUT
# (or /tmp). Runs in the repository root with the image's python3 (msgpack, uvloop, xxhash, prometheus-client
# and cupy are in it): PYTHONPATH=. so the checkout is what runs.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvtierd-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/device.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/gpu tests/test_paged_copy.py \
    tests/test_transformers_integration.py 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "pytest rc=${PIPESTATUS[0]}"
timeout 150 python3 bench/gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
timeout 140 python3 bench/ttft.py --model 8b --lengths 8192,16384 --reps 3 --disk-restarts 0 2>&1 | tee "$OUT/ttft_host.log"
echo "ttft host rc=${PIPESTATUS[0]}"
timeout 140 python3 bench/ttft.py --model 8b --lengths 8192,16384 --reps 3 --disk-restarts 0 --tier hbm \
    --hbm-bytes 8GiB 2>&1 | tee "$OUT/ttft_hbm.log"
echo "ttft hbm rc=${PIPESTATUS[0]}"
