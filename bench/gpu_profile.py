"""Nsight Compute's view of the 4-bit and W8A8 kernels on the 70B up-projection (8192 × 28672), one GPU.

Run under ``ncu --profile-from-start off`` (see bench/gpu_run.sh): every variant is compiled
and run once first, then each runs once more between cudaProfilerStart/Stop, so ncu sees
exactly those launches (with the zero-fill and copy of split-K beside them). ``--cuda`` profiles the
CUDA C++ W4A16 kernel's configs beside the Triton kernels it would replace instead. The sections
asked for (speed of light, occupancy, warp stall reasons) say whether a kernel is held by
DRAM, by instruction issue or by latency; bench/results/gpu_kernels_notes.md reads them.
"""

from __future__ import annotations

import sys

import torch

from lowbit.kernels.triton import prepare_w4a16, prepare_w8a8
from lowbit.kernels.triton.ops import BlockConfig, int4_config, launch_int4, launch_w8a8
from lowbit.scheme import QuantSpec, get_scheme
from lowbit.tensor import quantize_weight

K, N = 8192, 28672
VARIANTS = [  # (name, M, config)
    ("w4 gemv M=1", 1, BlockConfig(1, 128, 128, 3, 4, 1, backend="gemv")),
    ("w4 gemv xplanes M=1", 1, BlockConfig(1, 128, 128, 3, 4, 1, backend="gemv", xplanes=True)),
    ("w4 mma M=16", 16, BlockConfig(16, 64, 128, 1, 4, 4, backend="mma")),
    ("w4 mma plain M=16", 16, BlockConfig(16, 64, 128, 1, 4, 4, backend="mma", magic=False)),
    ("w4 mma plain M=2048", 2048, BlockConfig(128, 128, 64, 1, 8, 4, backend="mma", magic=False)),
    ("w4 dequant M=2048", 2048, BlockConfig(16, 64, 128, 1, 4, 1, backend="dequant")),
    ("w8a8 M=2048", 2048, BlockConfig(256, 128, 128, 1, 8, 4)),
]
# ``--cuda``: the CUDA C++ kernel's default configs (lowbit.kernels.cuda) beside the Triton ones it would replace
CUDA_VARIANTS = [
    ("w4 gemv M=1", 1, BlockConfig(1, 128, 128, 3, 4, 1, backend="gemv")),
    ("w4 cuda M=1", 1, int4_config(1, N, K, 128, K // 128, 132, cuda=True)),
    ("w4 cuda r1 s3 M=1", 1, BlockConfig(8, 16, 128, 4, 4, 3, backend="cuda")),
    ("w4 mma plain M=16", 16, BlockConfig(16, 64, 128, 1, 4, 4, backend="mma", magic=False)),
    ("w4 cuda M=16", 16, int4_config(16, N, K, 128, K // 128, 132, cuda=True)),
]


def main() -> None:
    dev = torch.device("cuda")
    W = torch.randn(N, K, device=dev) * 0.02
    w4 = quantize_weight(W, QuantSpec("int", 4, "group", 128))
    w8 = quantize_weight(W, get_scheme("W8A8").weights)
    p4, p8 = prepare_w4a16(w4), prepare_w8a8(w8)
    calls = []
    for name, m, cfg in CUDA_VARIANTS if "--cuda" in sys.argv else VARIANTS:
        x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
        out = torch.empty(m, N, device=dev, dtype=torch.bfloat16)
        if name.startswith("w8a8"):
            def call(x=x, out=out, cfg=cfg):
                launch_w8a8(out, x, p8["weight"], p8["scale"], None, cfg)
        else:
            def call(x=x, out=out, cfg=cfg):
                launch_int4(out, x, p4["qweight"], p4["scales"], None, None, None, None, None, 128, cfg)
        call()  # compile
        calls.append((name, call))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, call in calls:
        torch.cuda.nvtx.range_push(name)
        call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(name for name, _ in calls))


if __name__ == "__main__":
    main()
