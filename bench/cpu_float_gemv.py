"""lowbit's float GEMV (``lowbit::float_gemv_cpu``, `lowbit.nn.FloatLinear`) against torch's ``F.linear`` on
float weights: bench/results/cpu_float_gemv.{json,md}.

The layers a quantised model keeps in float run once per generated token; the tied output projection
of the default model (49152 × 576) is the largest. For that head, the default model's two linear shapes
and two LLaMA-7B shapes, float32, bfloat16 and float16 weights, and M = 1 to 12 tokens, each figure is the best of
``--rounds`` rounds in which ``F.linear``, the GEMV and a sum of the weight (``W.sum()``: a read of every
byte, the memory bandwidth the GEMV can approach) take turns, per layer. The small shapes are timed over
enough distinct weights to fill 64 MB, so that they come from DRAM as a model's layers do. Each GEMV
output is checked against float64 sums before timing. `lowbit.nn.float_linear.MAX_M` is read off this table.

    python bench/cpu_float_gemv.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _cpu_results import Stamp, write

from lowbit.kernels import cpu

SHAPES = {"default model lm_head (tied)": (49152, 576), "default model MLP up": (1536, 576),
          "default model MLP down": (576, 1536), "LLaMA-7B q/k/v/o": (4096, 4096), "LLaMA-7B MLP down": (4096, 11008)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS = (1, 2, 4, 6, 8, 12)
FILL = 64 << 20


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    exact = x.double() @ w.double().T
    bound = (w.shape[1] / 16 + 8) * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + \
        torch.finfo(y.dtype).eps * exact.abs()
    if not ((y.double() - exact).abs() <= bound).all():
        raise SystemExit(f"float_gemv_cpu is wrong on {tuple(w.shape)} {w.dtype} at M = {x.shape[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="cpu_float_gemv", help="bench/results/<name>.{json,md}.")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if cpu.extension() is not None:
        raise SystemExit(f"lowbit's CPU kernels are not available: {cpu.extension()}")
    torch.set_num_threads(args.threads)
    stamp = Stamp()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, (n, k) in SHAPES.items():
        for dname, dtype in DTYPES.items():
            count = max(1, FILL // (n * k * dtype.itemsize))
            weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(count)]
            for m in TOKENS:
                x = torch.randn(m, k, generator=gen).to(dtype)
                for w in weights[:3]:
                    check(cpu.FLOAT_GEMV_OP(x, w, None), x, w)
                runs = {"F.linear": lambda w, x=x: F.linear(x, w),
                        "lowbit": lambda w, x=x: cpu.FLOAT_GEMV_OP(x, w, None),
                        "sum": lambda w: w.sum()}
                best = dict.fromkeys(runs, float("inf"))
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        for w in weights:
                            run(w)
                        best[name] = min(best[name], (time.perf_counter() - start) / count)
                row = {"layer": label, "shape": [n, k], "dtype": dname, "M": m, "weights": count,
                       **{f"{name}_us": best[name] * 1e6 for name in runs},
                       "speedup": best["F.linear"] / best["lowbit"],
                       "lowbit_GB_per_s": n * k * dtype.itemsize / best["lowbit"] / 1e9,
                       "sum_GB_per_s": n * k * dtype.itemsize / best["sum"] / 1e9}
                rows.append(row)
                print(f"{label} {n}×{k} {dname} M={m}: F.linear {row['F.linear_us']:.1f} µs, lowbit "
                      f"{row['lowbit_us']:.1f} µs ({row['speedup']:.2f}×), sum {row['sum_us']:.1f} µs", flush=True)
    env = stamp.finish()
    lines = ["# lowbit's float GEMV against F.linear on float weights (CPU)", "",
             f"Measured {env['date']} on {env['machine']} ({env['load']}); best of {args.rounds} interleaved rounds, "
             "per layer; small shapes over enough distinct weights to fill 64 MB (they come from DRAM). "
             "`W.sum()` reads every byte of the weight once: the bandwidth the GEMV can approach.", "",
             "| layer | shape | weights | M | F.linear µs | lowbit µs | × F.linear | lowbit GB/s | W.sum() GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['dtype']} | {r['M']} | "
                     f"{r['F.linear_us']:.1f} | {r['lowbit_us']:.1f} | {r['speedup']:.2f} | "
                     f"{r['lowbit_GB_per_s']:.1f} | {r['sum_GB_per_s']:.1f} |")
    write(args.name, env, rows, lines)


if __name__ == "__main__":
    main()
