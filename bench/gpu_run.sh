#!/usr/bin/env bash
# One device call: bench/gpu_kernels.py (checks + timings + memory), then the Triton and FP8 tests on CUDA.
# Usage on the GPU machine, from the repository root: OUT=<dir> bash bench/gpu_run.sh [bench seconds] [test seconds]
set -u
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (bitsandbytes)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
    > "$OUT/nvidia-smi.csv" 2>&1
timeout "${1:-420}" python3 bench/gpu_kernels.py --out "$OUT" --progress "$OUT/progress.jsonl" --warmup 5 --rep 25 \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
[ "${2:-100}" -gt 0 ] && TRITON_INTERPRET=0 timeout "${2:-100}" python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton.py \
    tests/kernels/test_fp8_kernel.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/pytest.log"
tail -n 45 "$OUT/bench.log"
tail -n 4 "$OUT/pytest.log"
