#!/usr/bin/env bash
# One device call: the E8P kernels (bench/gpu_e8p.py: checks, timings beside bf16), then a confirmation run of
# bench/gpu_kernels.py's 70B rows at M = 1, 16, 2048 with the launchers' own configs.
# Usage on the GPU machine, from the repository root: OUT=<dir> bash bench/gpu_run_e8p.sh [e8p seconds] [kernels seconds]
source bench/gpu_env.sh
timeout "${1:-240}" python3 bench/gpu_e8p.py --out "$OUT" > "$OUT/e8p.log" 2>&1
echo "e8p rc=$?" | tee -a "$OUT/e8p.log"
timeout "${2:-150}" python3 bench/gpu_kernels.py --out "$OUT" --progress "$OUT/progress.jsonl" \
    --shapes 8192x28672,28672x8192 --tokens 1,16,2048 --no-sweep --warmup 25 --rep 100 > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?" | tee -a "$OUT/kernels.log"
tail -n 25 "$OUT/e8p.log"
tail -n 14 "$OUT/kernels.log"
