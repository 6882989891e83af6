#!/usr/bin/env bash
# One device call for the CUDA C++ W4A16 kernel (src/lowbit/kernels/csrc/w4a16_mma.cu), first on a GPU:
# 1. its tests on CUDA (tests/kernels/test_cuda.py: NVRTC compile, then the kernel against the reference on awkward
#    shapes, sym/asym, bf16/fp16, bias, split K, twice per case so the split-K counters are seen to reset);
# 2. bench/gpu_kernels.py, w4a16 alone, on the 70B and two 7B shapes at M = 1, 16, 32: the launchers' configs and the
#    sweep, whose candidates start with the CUDA kernel's (each checked against the reference, then timed beside
#    bf16 F.linear in the same run, L2 flushed);
# 3. ptxas's register report of the compiled variants (nvcc, sm_90a) for the notes.
# Usage on the GPU machine, from the repository root: OUT=<dir> bash bench/gpu_run_cuda.sh [bench seconds] [test s]
source bench/gpu_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
TRITON_INTERPRET=0 timeout "${2:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cuda.py \
    > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/pytest_cuda.log"
tail -n 30 "$OUT/pytest_cuda.log"
timeout "${1:-300}" python3 bench/gpu_kernels.py --out "$OUT" --progress "$OUT/progress.jsonl" --kernels w4a16 \
    --shapes 8192x28672,28672x8192,4096x4096,11008x4096 --tokens 1,16,32 --sweep-tokens 1,16,32 \
    --deadline "$(( ${1:-300} * 2 / 3 ))" --warmup 10 --rep 50 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
python3 - > "$OUT/ptxas.txt" 2>&1 <<'PY'
from lowbit.kernels import cuda
vs = [cuda.Variant(0, 2, r, t, z, False, w) for t in (1, 2, 4) for r in (1, 2, 4) if r == cuda.max_rows(t, r)
      for z in (False, True) for w in (4, 8)]
src = cuda.SOURCE.read_text() + "".join(v.entry_point(f"k{i}") for i, v in enumerate(vs))
reports = cuda.ptxas_reports(cuda.compile_nvcc(src, "sm_90a", verbose=True)[1])
for i, v in enumerate(vs):
    print(v, reports[f"k{i}"])
PY
grep -c "cuda" "$OUT/progress.jsonl" 2>/dev/null
grep -A 200 "^| K × N | M | bf16" "$OUT/bench.log" | grep -v "^$" | tail -n 60
