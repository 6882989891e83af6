#!/usr/bin/env bash
# One device call for the CUDA C++ W4A16 kernel (src/lowbit/kernels/csrc/w4a16_mma.cu), first on a GPU:
# 1. its tests on CUDA (tests/kernels/test_cuda.py: NVRTC compile, then the kernel against the reference on awkward
#    shapes, sym/asym, bf16/fp16, bias, split K, twice per case so the split-K counters are seen to reset);
# 2. bench/gpu_kernels.py, w4a16, w8a16 and w3a16, on the 70B and two 7B shapes at M = 1, 16, 32 and 2048: the
#    int4 launchers' configs (and at M <= 32 the sweep, whose candidates start with the CUDA kernel's), and
#    lowbit.kernels.cuda on int8 per-channel and int3 g128 weights (tensor cores to 32 tokens, dequantise + cuBLAS
#    above), each checked against the reference, then timed beside bf16 F.linear in the same run, L2 flushed;
# 3. Nsight Compute on its default configs beside the Triton kernels (bench/gpu_profile.py --cuda), if time is given.
# Usage on the GPU machine, from the repository root:
#   OUT=<dir> bash bench/gpu_run_cuda.sh [bench seconds] [test seconds] [ncu seconds, 0: no profile]
# (ptxas's register report needs no GPU: the same nvcc 13.0 gives it here, see tests/kernels/test_cuda.py.)
source bench/gpu_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
# (the CPU-side tests of the same file - host runs, nvcc/NVRTC compiles - run in CI; 8 processes share the NVRTC compiles)
T=tests/kernels/test_triton.py
TRITON_INTERPRET=0 timeout "${2:-150}" python3 -m pytest -q -x -n 8 -p no:cacheprovider \
    "tests/kernels/test_cuda.py::test_the_kernel_matches_the_reference" \
    "tests/kernels/test_cuda.py::test_int3_and_int8_through_the_dispatcher_match_the_reference" \
    "tests/kernels/test_cuda.py::test_the_dequantise_kernel_matches_the_reference_bit_for_bit" \
    "$T::test_a_cuda_config_the_cuda_kernel_cannot_take_runs_the_launchers_choice" \
    "$T::test_asking_for_the_cuda_kernel_where_it_cannot_run_runs_the_launchers_choice" > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/pytest_cuda.log"
tail -n 30 "$OUT/pytest_cuda.log"
timeout "${1:-300}" python3 bench/gpu_kernels.py --out "$OUT" --progress "$OUT/progress.jsonl" --kernels w4a16,w8a16,w3a16 \
    --shapes 8192x28672,28672x8192,4096x4096,11008x4096 --tokens 1,16,32,2048 --sweep-tokens 1,16,32 \
    --deadline "$(( ${1:-300} * 2 / 3 ))" --warmup 10 --rep 50 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ "${3:-60}" -gt 0 ] && [ -n "$NCU" ]; then
    timeout "${3:-60}" "$NCU" --profile-from-start off --nvtx --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats --csv --page details python3 bench/gpu_profile.py --cuda \
        > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
    echo "ncu rc=$?" | tee -a "$OUT/ncu.err"
fi
grep -c '"backend": "cuda"' "$OUT/progress.jsonl" 2>/dev/null
grep -A 200 "^| K × N | M | bf16" "$OUT/bench.log" | grep -v "^$" | tail -n 60
