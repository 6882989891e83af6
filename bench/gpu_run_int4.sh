#!/usr/bin/env bash
# One device call for the int4 (W4A16 g128) paths: bench/gpu_kernels.py, w4a16 alone, on the 70B shapes and two 7B
# shapes at M = 2048, 16 and 1 (the launchers' configs everywhere; at 2048 and 16 also the fused x-left GEMM, the
# scaled-decode tensor-core kernel and the chunked dequantise + cuBLAS, each checked against the reference), then
# the 4-bit block-config tests on CUDA.
# Usage on the GPU machine, from the repository root: OUT=<dir> bash bench/gpu_run_int4.sh [bench seconds] [test seconds]
# After two thirds of the bench's seconds only the launchers' own configs are timed, so the table always ends.
source bench/gpu_env.sh
timeout "${1:-330}" python3 bench/gpu_kernels.py --out "$OUT" --progress "$OUT/progress.jsonl" --kernels w4a16 \
    --shapes 8192x28672,28672x8192,4096x4096,11008x4096 --tokens 2048,16,1 --sweep-tokens 2048,16 \
    --deadline "$(( ${1:-330} * 2 / 3 ))" --warmup 10 --rep 50 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
if [ "${2:-60}" -gt 0 ]; then TRITON_INTERPRET=0 timeout "${2:-60}" python3 -m pytest -q -n 8 -p no:cacheprovider \
    tests/kernels/test_triton.py -k "gemm or block_configs" > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?" | tee -a "$OUT/pytest.log"; fi
grep -A 200 "^| K × N | M | bf16" "$OUT/bench.log" | grep -v "^$" | tail -n 75
[ -f "$OUT/pytest.log" ] && tail -n 4 "$OUT/pytest.log"
