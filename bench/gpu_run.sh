#!/usr/bin/env bash
# One device call: bench/gpu_kernels.py (checks + timings + memory), Nsight Compute on bench/gpu_profile.py, then the
# Triton and FP8 tests on CUDA.
# Usage on the GPU machine, from the repository root:
#   OUT=<dir> [BENCH_ARGS="..."] bash bench/gpu_run.sh [bench seconds] [test seconds] [ncu seconds, 0: no profile]
# BENCH_ARGS replaces the bench's timing options (default: --warmup 5 --rep 25), e.g. "--no-sweep --rep 100".
source bench/gpu_env.sh
timeout "${1:-420}" python3 bench/gpu_kernels.py --out "$OUT" --progress "$OUT/progress.jsonl" \
    --deadline "$(( ${1:-420} * 3 / 4 ))" ${BENCH_ARGS:---warmup 5 --rep 25} > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
# Nsight Compute on the main variants (bench/gpu_profile.py): speed of light, occupancy, stall reasons
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ "${3:-0}" -gt 0 ] && [ -n "$NCU" ]; then
    timeout "$3" "$NCU" --profile-from-start off --nvtx --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats --csv --page details python3 bench/gpu_profile.py \
        > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
    echo "ncu rc=$?" | tee -a "$OUT/ncu.err"
fi
# pytest-xdist spreads the tests (each shape compiles its own kernels) over 8 processes
if [ "${2:-100}" -gt 0 ]; then TRITON_INTERPRET=0 timeout "${2:-100}" python3 -m pytest -q -n 8 -p no:cacheprovider \
    tests/kernels/test_triton.py tests/kernels/test_fp8_kernel.py > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?" | tee -a "$OUT/pytest.log"; fi
tail -n 45 "$OUT/bench.log"
[ -f "$OUT/pytest.log" ] && tail -n 4 "$OUT/pytest.log"
