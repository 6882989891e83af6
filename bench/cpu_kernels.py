"""Per-layer times of the CPU kernels on the default model's linear shapes: bench/results/cpu_kernels.{json,md}.

For each weight format (every integer width and group size the presets and the planner use, NF4,
FP4, and GPTQ act-order's scattered groups, a g_idx, at 3, 4 and 8 bits) and each of the default model's two linear shapes (1536 × 576 and 576 × 1536), the decode
kernel (`cpu-int-gemv`) is timed at M = 1 and 4 tokens beside float32 ``F.linear`` and the
reference kernel (dequantise + ``F.linear``); at M = 1 also on the float path
(``LOWBIT_CPU_FLOAT_GEMV=1``), which the integer path for 4-bit codes replaces where the CPU has AVX-512 VNNI
(other formats take the float path either way). Each figure is the best of ``--repeats`` passes over
60 distinct weights of the shape (so they come from DRAM, as a model's layers do), per layer.
The kernel's output is checked against the reference's on every weight before timing.

    python bench/cpu_kernels.py [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _cpu_results import Stamp, write

from lowbit.kernels import quantized_linear
from lowbit.kernels.cpu import INT_GEMV, build_features
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, quantize_weight

SHAPES = [(1536, 576), (576, 1536)]  # (out, in): the default model's MLP up/gate and down projections
LAYERS = 60
FORMATS = {
    "int8 per-channel": QuantSpec("int", 8, "channel"),
    "int4 g128": QuantSpec("int", 4, "group", 128),
    "int4 asym g128": QuantSpec("int", 4, "group", 128, symmetric=False),
    "int4 asym g64": QuantSpec("int", 4, "group", 64, symmetric=False),
    "int4 g32 (Q4_0)": QuantSpec("int", 4, "group", 32),
    "int3 asym g128": QuantSpec("int", 3, "group", 128, symmetric=False),
    "int3 asym g64": QuantSpec("int", 3, "group", 64, symmetric=False),
    "int3 asym g32": QuantSpec("int", 3, "group", 32, symmetric=False),
    "int2 asym g64": QuantSpec("int", 2, "group", 64, symmetric=False),
    "nf4 g64": QuantSpec("nf4", 4, "group", 64),
    "nf4 g64 double-quant": QuantSpec("nf4", 4, "group", 64, double_quant=True),
    "fp4 g32": QuantSpec("fp4", 4, "group", 32),
}
ACT_ORDER = {  # GPTQ desc_act layers: codes whose groups lie scattered over the columns, placed by a g_idx
    "int4 g128 act-order (g_idx)": QuantSpec("int", 4, "group", 128),
    "int4 asym g32 act-order (g_idx)": QuantSpec("int", 4, "group", 32, symmetric=False),
    "int3 asym g128 act-order (g_idx)": QuantSpec("int", 3, "group", 128, symmetric=False),
    "int8 g128 act-order (g_idx)": QuantSpec("int", 8, "group", 128),
}


def act_order(weight: QuantizedWeight, gen: torch.Generator) -> QuantizedWeight:
    """The weight's codes with GPTQ act-order's g_idx: group i is the i-th run of ``group_size`` columns of a
    random column order (GPTQ's is by decreasing Hessian diagonal), so every group's columns lie scattered."""
    order = torch.randperm(weight.shape[1], generator=gen)
    return dataclasses.replace(weight, g_idx=(torch.argsort(order) // weight.group_size).to(torch.int32))


def best_per_layer(run: Callable[[int], object], repeats: int) -> float:
    """Best of ``repeats`` passes over the layers (after one warm-up), in µs per layer."""
    for i in range(LAYERS):
        run(i)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(LAYERS):
            run(i)
        best = min(best, time.perf_counter() - start)
    return best / LAYERS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="cpu_kernels", help="bench/results/<name>.{json,md}.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-repeats", type=int, default=1, help="Passes for the (slow) reference kernel.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stamp = Stamp()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        floats = [torch.randn(out_f, in_f, generator=gen) for _ in range(LAYERS)]
        xs = {m: torch.randn(m, in_f, generator=gen) for m in (1, 4)}
        fp = {m: best_per_layer(lambda i, m=m: F.linear(xs[m], floats[i]), args.repeats) for m in xs}
        for name, spec in {**FORMATS, **ACT_ORDER}.items():
            weights = [quantize_weight(w, spec) for w in floats]
            if name in ACT_ORDER:
                weights = [act_order(w, gen) for w in weights]
            prepared = [INT_GEMV.prepare(w) for w in weights]
            reason = INT_GEMV.supports(weights[0], None, torch.device("cpu"))
            if reason is not None:
                raise SystemExit(f"{name}: the CPU kernel cannot run it here ({reason}).")
            for m, x in xs.items():
                for i, w in enumerate(weights):  # right before fast
                    ref = quantized_linear(x, w)
                    got = INT_GEMV.run(x, prepared[i], w, None, None)
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
                kernel = best_per_layer(lambda i, m=m: INT_GEMV.run(xs[m], prepared[i], weights[i], None, None),
                                        args.repeats)
                reference = best_per_layer(lambda i, m=m: quantized_linear(xs[m], weights[i]), args.reference_repeats)
                float_path = None
                if m == 1:
                    os.environ["LOWBIT_CPU_FLOAT_GEMV"] = "1"
                    try:
                        float_path = best_per_layer(lambda i: INT_GEMV.run(xs[1], prepared[i], weights[i], None, None),
                                                    args.repeats)
                    finally:
                        del os.environ["LOWBIT_CPU_FLOAT_GEMV"]
                rows.append({"shape": [out_f, in_f], "format": name, "tokens": m,
                             "bits_per_weight": weights[0].bits_per_weight, "kernel_us": kernel,
                             "float_path_us": float_path, "reference_us": reference, "fp32_us": fp[m]})
                print(f"{out_f}×{in_f} {name:32s} M={m}: kernel {kernel:7.1f} µs, reference {reference:8.1f} µs, "
                      f"FP32 F.linear {fp[m]:6.1f} µs" + (f", float path {float_path:7.1f} µs" if float_path else ""),
                      flush=True)
    env = stamp.finish()
    lines = ["# CPU decode kernels per layer (the default model's linear shapes)", "",
             f"Measured {env['date']} on {env['machine']} ({env['load']}). µs per layer, best of {args.repeats} passes over {LAYERS} "
             "distinct weights (the reference kernel: best of "
             f"{args.reference_repeats}); every kernel output checked against the reference's first. The last column "
             "times M = 1 again with LOWBIT_CPU_FLOAT_GEMV=1: only 4-bit affine codes (not act-order) have another path "
             f"(integers, with AVX-512 VNNI: {'in' if 'vnni' in build_features() else 'not in'} this build); for the "
             "rest both columns run the same code, and differ by this machine's noise.", "",
             "| shape (out × in) | weights | bits/weight | M | kernel µs | × FP32 F.linear | reference µs | "
             "kernel × reference | float path µs (M = 1) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        float_path = "–" if r["float_path_us"] is None else f"{r['float_path_us']:.1f}"
        lines.append(f"| {r['shape'][0]} × {r['shape'][1]} | {r['format']} | {r['bits_per_weight']:.3f} | "
                     f"{r['tokens']} | {r['kernel_us']:.1f} | {r['fp32_us'] / r['kernel_us']:.2f} | "
                     f"{r['reference_us']:.0f} | {r['reference_us'] / r['kernel_us']:.0f} | {float_path} |")
    write(args.name, env, rows, lines)


if __name__ == "__main__":
    main()
