"""The CPU kernels across the number of tokens M, beside float32 ``F.linear``: bench/results/cpu_prefill.{json,md}.

Issue 4 asks that no quantised layer be more than ~5 % slower than the float baseline at any M.
For the default model's two linear shapes and LLaMA-7B's three (4096 × 4096, 11008 × 4096,
4096 × 11008), with int4 g128, int4 g128 act-order (a GPTQ desc_act g_idx), int8 per-channel,
int3 asym g128, NF4 g64 and int2 asym g64 weights, at M = 1 … 256 tokens, this times

- float32 ``F.linear`` on the float weight (the baseline),
- the decode GEMV (`cpu-int-gemv`), up to M = 64,
- the prefill op as it runs (`cpu-dequant-gemm`: the weight dequantised ``BLOCK_BYTES`` at a
  time, each block's GEMM right after), and the same op with one block (the whole float weight
  written per call, which is how it ran before 2026-11-28),
- and names the kernel the dispatcher picks at that M.

Figures are ms per layer, the best of ``--repeats`` rounds, the variants taking turns within each
round so that the shared machine's slow spells fall on all of them alike. The default model's
shapes cycle through enough distinct weights (~128 MB of float32) that each comes from DRAM, as a
model's layers do; one 7B layer is larger than the cache by itself. Every kernel's output is checked
against the reference's before timing. For the 7B shapes (int4 g128, the largest M) the peak resident
memory one cold call adds is measured too, each in a fresh process: the whole float weight against the
threads' blocks.

    python bench/cpu_prefill.py [--repeats 5] [--threads 2] [--tokens 1,4,...] [--shapes 4096x4096,...]
                                [--formats "int4 g128,..."] [--name NAME]
"""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _cpu_results import Stamp, write
from cpu_kernels import act_order

from lowbit.kernels import dispatch, quantized_linear
from lowbit.kernels.cpu import (_DEQUANT_LINEAR_OP, BLOCK_BYTES, DEQUANT_GEMM, INT_GEMV, _in_order, _operands,
                               block_rows)
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, quantize_weight

SHAPES = [(1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
FORMATS = {
    "int4 g128": (QuantSpec("int", 4, "group", 128), False),
    "int4 g128 act-order (g_idx)": (QuantSpec("int", 4, "group", 128), True),
    "int8 per-channel": (QuantSpec("int", 8, "channel"), False),
    "int3 asym g128": (QuantSpec("int", 3, "group", 128, symmetric=False), False),
    "nf4 g64": (QuantSpec("nf4", 4, "group", 64), False),
    "int2 asym g64": (QuantSpec("int", 2, "group", 64, symmetric=False), False),
}
TOKENS = (1, 4, 8, 12, 16, 24, 32, 64, 256)
GEMV_MAX_TOKENS = 64  # beyond this the GEMV is far behind; not timed
DRAM_BYTES = 128 << 20  # float32 bytes of distinct weights cycled through per shape
PEAK_WEIGHTS = 4096 * 4096  # the 7B shapes: their peak memory per call is measured too


def whole(x: torch.Tensor, weight: QuantizedWeight, prepared: dict) -> torch.Tensor:
    """The prefill op with one block: the whole float weight written per call."""
    packed, extra = _operands(weight, prepared)
    return _DEQUANT_LINEAR_OP(_in_order(x, prepared), *packed, weight.shape[0], **extra, block_rows=weight.shape[0])


def peak_added_mb(shape: tuple[int, int], variant: str, tokens: int, threads: int) -> float:
    """Resident memory one cold prefill call adds at its peak, in MB: measured in a fresh process (this one's
    freed memory would hide it), which quantises an int4 g128 weight, frees the float one, resets its peak
    (VmHWM) to what it holds, and runs the call once, workspaces and all."""
    done = subprocess.run([sys.executable, __file__, "--peak-child", f"{shape[0]}x{shape[1]}", variant, str(tokens),
                           str(threads)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def peak_child(shape: str, variant: str, tokens: int, threads: int) -> None:
    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])  # kB
        raise KeyError(key)

    torch.set_num_threads(threads)
    out_f, in_f = (int(d) for d in shape.split("x"))
    weight = quantize_weight(torch.randn(out_f, in_f) * 0.02, FORMATS["int4 g128"][0])
    x = torch.randn(tokens, in_f)
    if variant == "blocks":
        def run():
            return DEQUANT_GEMM.run(x, {}, weight, None, None)
    else:
        def run():
            return whole(x, weight, {})
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    run()
    print((status("VmHWM:") - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma-separated.")
    parser.add_argument("--formats", default=",".join(FORMATS), help="Comma-separated names of FORMATS.")
    parser.add_argument("--name", default="cpu_prefill", help="bench/results/<name>.{json,md} (a partial run's own).")
    parser.add_argument("--peak-child", nargs=4, metavar=("SHAPE", "VARIANT", "TOKENS", "THREADS"),
                        help=argparse.SUPPRESS)  # peak_added_mb's fresh process
    args = parser.parse_args()
    if args.peak_child:
        shape, variant, m, threads = args.peak_child
        return peak_child(shape, variant, int(m), int(threads))
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    formats = {k: FORMATS[k] for k in args.formats.split(",")}
    stamp = Stamp()
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    rows = []
    for out_f, in_f in [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]:
        layers = max(1, math.ceil(DRAM_BYTES / (out_f * in_f * 4)))
        floats = [torch.randn(out_f, in_f, generator=gen) * 0.02 for _ in range(layers)]
        for name, (spec, scattered) in formats.items():
            weights = [quantize_weight(w, spec) for w in floats]
            if scattered:
                weights = [act_order(w, gen) for w in weights]
            prepared = [INT_GEMV.prepare(w) for w in weights]  # NF4's levels; nothing for integer codes
            dequantized = [w.dequantize() for w in weights]  # the float baseline runs on these
            for m in tokens:
                x = torch.randn(m, in_f, generator=gen)
                variants: dict[str, Callable[[int], torch.Tensor]] = {
                    "fp32": lambda i: F.linear(x, dequantized[i]),
                    "blocks": lambda i: DEQUANT_GEMM.run(x, prepared[i], weights[i], None, None),
                    "whole": lambda i: whole(x, weights[i], prepared[i]),
                }
                if m <= GEMV_MAX_TOKENS:
                    variants["gemv"] = lambda i: INT_GEMV.run(x, prepared[i], weights[i], None, None)
                ref = quantized_linear(x, weights[0])
                for variant, run in variants.items():  # right before fast
                    torch.testing.assert_close(run(0), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item(),
                                               msg=lambda msg, v=variant: f"{variant}: {msg}")
                best = dict.fromkeys(variants, math.inf)
                for _ in range(args.repeats + 1):  # the first round warms up
                    for variant, run in variants.items():
                        start = time.perf_counter()
                        for i in range(layers):
                            run(i)
                        best[variant] = min(best[variant], (time.perf_counter() - start) / layers * 1e3)
                chosen = dispatch.choose(weights[0], None, cpu, m).name
                chosen_ms = best["gemv" if chosen == INT_GEMV.name else "blocks"]
                row = {"shape": [out_f, in_f], "format": name, "tokens": m, "chosen": chosen,
                       "chosen_ms": chosen_ms, "fp32_ms": best["fp32"], "blocks_ms": best["blocks"],
                       "whole_ms": best["whole"], "gemv_ms": best.get("gemv"), "block_rows": block_rows(out_f, in_f, m)}
                if out_f * in_f >= PEAK_WEIGHTS and m == tokens[-1] and name == "int4 g128":
                    row["peak_mb_blocks"] = peak_added_mb((out_f, in_f), "blocks", m, args.threads)
                    row["peak_mb_whole"] = peak_added_mb((out_f, in_f), "whole", m, args.threads)
                rows.append(row)
                print(f"{out_f}×{in_f} {name} M={m}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in best.items())
                      + f"; chosen {chosen} = {best['fp32'] / chosen_ms:.2f}× FP32", flush=True)
    env = stamp.finish()
    lines = ["# CPU kernels across M beside float32 F.linear", "",
             f"Measured {env['date']} on {env['machine']} ({env['load']}). ms per layer, best of {args.repeats} "
             "rounds in which the variants take turns; the default model's shapes cycle through ~128 MB of distinct "
             "weights. `blocks`: the prefill op as it runs (the weight dequantised "
             f"{BLOCK_BYTES >> 20} MB of float32 at a time, then each block's GEMM); `whole`: the same op writing "
             "the whole float weight per call (the prefill path before 2026-11-28); `chosen`: what the dispatcher "
             "runs at that M. Every output checked against the reference first.", "",
             "| shape (out × in) | weights | M | FP32 ms | GEMV ms | blocks ms | whole ms | chosen | chosen × FP32 |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        gemv = "–" if r["gemv_ms"] is None else f"{r['gemv_ms']:.2f}"
        lines.append(f"| {r['shape'][0]} × {r['shape'][1]} | {r['format']} | {r['tokens']} | {r['fp32_ms']:.2f} | "
                     f"{gemv} | {r['blocks_ms']:.2f} | {r['whole_ms']:.2f} | {r['chosen']} | "
                     f"{r['fp32_ms'] / r['chosen_ms']:.2f} |")
    peaks = [r for r in rows if "peak_mb_blocks" in r]
    if peaks:
        lines += ["", f"Peak resident memory one cold prefill call adds (M = {peaks[0]['tokens']}; a fresh process per "
                  "figure, its VmHWM reset before the call; `blocks` includes the threads' workspaces, allocated by "
                  "this first call and kept for later ones):", "",
                  "| shape (out × in) | weights | blocks MB (rows per block) | whole float weight MB |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r['shape'][0]} × {r['shape'][1]} | {r['format']} | {r['peak_mb_blocks']:.1f} "
                  f"({r['block_rows']}) | {r['peak_mb_whole']:.1f} |" for r in peaks]
    write(args.name, env, rows, lines)


if __name__ == "__main__":
    main()
