"""The E8P (QuIP#) decode and decode-matmul Triton kernels on one GPU: checked, then timed beside bf16.

1. Checks on awkward shapes (rows and columns not powers of two, M = 1, 7, 33): the decode
   kernel must equal the reference decoder (`E8PWeight.dequantize`, rows of the full
   65536-entry codebook) exactly; `e8p_linear` on float32 and bfloat16 inputs is compared
   with float64 ``x · Wᵀ + b`` by ‖out − ref‖ / ‖ref‖ (float32: ≤ 1e-5, the IEEE path;
   bfloat16: ≤ 8e-3, tensor cores with the output rounded to bfloat16). Each output's memory is
   poisoned first: a NaN-filled block of the same size is freed just before the call, which
   the caching allocator hands to the kernel's output, so an unwritten element shows as NaN.
2. Timings (median of ``triton.testing.do_bench``, L2 flushed before each repetition) on the
   LLaMA-7B/70B shapes at M = 1, 16, 2048: bf16 ``F.linear``, `e8p_linear` with the
   launcher's choice (the CUDA-core GEMV up to GEMV_MAX_M tokens, else the tensor-core kernel,
   split-K where the tiles leave SMs idle) and with each candidate of a small sweep over both
   paths (``path`` 'gemv' or 'dot'; each one's matmul checked too, the shape's decode once), and decode + cuBLAS (the E8P decode
   kernel straight to bfloat16, bit-equal to ``dequantize(torch.bfloat16)``, then ``F.linear``)
   for M ≥ 256.

Writes gpu_e8p_<card>.json and .md to ``--out`` (default bench/results). ``--smoke``: CPU under
TRITON_INTERPRET=1, tiny shapes, wall-clock timing, nothing written unless ``--out`` is given.

    python bench/gpu_e8p.py [--out DIR] [--smoke] [--tokens 1,16,2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPES = [(8192, 28672), (28672, 8192), (4096, 4096)]  # (K, N)
TOKENS = [1, 16, 2048]
CHECKS = [((70, 24), 5), ((33, 200), 1), ((257, 1032), 7), ((1000, 4104), 33)]  # ((N, K), M)
GEMV_SWEEP = [dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in
              ((64, 256, 4), (32, 256, 4), (64, 512, 4), (128, 512, 8))] + [
              dict(path="gemv", BLOCK_N=64, BLOCK_K=256, num_warps=4, split_k=1)]
DOT_SWEEP = [dict(path="dot", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bm, bn, bk, w in
             ((16, 128, 64, 4), (16, 64, 64, 4), (64, 128, 64, 4), (64, 64, 64, 4), (128, 128, 64, 8),
              (128, 256, 64, 8))]
SWEEP = GEMV_SWEEP + DOT_SWEEP

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true")
parser.add_argument("--out", default=None)
parser.add_argument("--warmup", type=int, default=10)
parser.add_argument("--rep", type=int, default=40)
parser.add_argument("--tokens", default=None, help="comma-separated M values (default 1,16,2048)")
ARGS = parser.parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

from _timing import median_us  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.algorithms.ldlq import E8PWeight  # noqa: E402
from lowbit.kernels.triton.e8p import (DECODE_MIN_M, DOT_TILES, DOT_TILES_LARGE, DOT_TILES_MID,  # noqa: E402
                                       GEMV_MAX_M, GEMV_TILES, e8p_decode, e8p_linear)


def timer(fn) -> float:
    """Median microseconds of one call."""
    return median_us(fn, ARGS.smoke, ARGS.warmup, ARGS.rep)


def random_weight(n: int, k: int, device, gen) -> E8PWeight:
    codes = torch.randint(-32768, 32768, (n, k // 8), generator=gen).to(torch.int16).to(device)
    scale = (torch.rand(n, generator=gen) * 0.02 + 0.01).half().to(device)
    return E8PWeight(codes, scale)


def poisoned_call(fn, shape, dtype, device):
    """Run fn() right after freeing a NaN-filled block of the output's size (see the module docstring)."""
    block = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del block
    return fn()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("inf")


def check_decode(weight: E8PWeight, device) -> tuple[bool, torch.Tensor]:
    """Whether the decode kernel equals the reference decoder bit for bit (float32 and bfloat16), and the
    reference float32 weight (on ``device``) for the matmul checks."""
    n, k = weight.shape
    ref_w = weight.dequantize().to(device)
    dec = poisoned_call(lambda: e8p_decode(weight.codes, weight.scale), (n, k), torch.float32, device)
    dec_bf16 = poisoned_call(lambda: e8p_decode(weight.codes, weight.scale, torch.bfloat16), (n, k), torch.bfloat16,
                             device)
    return bool(torch.equal(dec, ref_w)) and bool(torch.equal(dec_bf16, weight.dequantize(torch.bfloat16))), ref_w


def check_linear(weight: E8PWeight, ref_w: torch.Tensor, m: int, device, gen, config=None) -> dict:
    """`e8p_linear` with ``config`` on float32 and bfloat16 x against float64 x · Wᵀ + b."""
    n, k = weight.shape
    row = {"N": n, "K": k, "M": m, "config": config}
    bias = torch.randn(n, generator=gen).to(device)
    x = torch.randn(m, k, generator=gen).to(device)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
        xd = x.to(dtype)
        ref = F.linear(xd.double(), ref_w.double(), bias.double())
        out = poisoned_call(lambda: e8p_linear(xd, weight.codes, weight.scale, bias, config), (m, n), dtype, device)
        name = str(dtype).removeprefix("torch.")
        row[f"rel_err_{name}"] = rel_err(out, ref)
        row[f"ok_{name}"] = row[f"rel_err_{name}"] <= tol
    row["ok"] = row["ok_float32"] and row["ok_bfloat16"]
    return row


def check(weight: E8PWeight, m: int, device, gen) -> dict:
    exact, ref_w = check_decode(weight, device)
    row = {**check_linear(weight, ref_w, m, device, gen), "decode_exact": exact}
    return {**row, "ok": row["ok"] and exact}


def main() -> None:
    device = torch.device("cpu" if ARGS.smoke else "cuda")
    gen = torch.Generator().manual_seed(0)
    checks, timings = [], []
    for (n, k), m in (CHECKS[:2] if ARGS.smoke else CHECKS):
        checks.append(check(random_weight(n, k, device, gen), m, device, gen))
        print(json.dumps(checks[-1]), flush=True)
    shapes = [(256, 96)] if ARGS.smoke else SHAPES
    tokens = [int(t) for t in ARGS.tokens.split(",")] if ARGS.tokens else [1, 16] if ARGS.smoke else TOKENS
    sweep = [GEMV_SWEEP[0], GEMV_SWEEP[-1], DOT_SWEEP[0]] if ARGS.smoke else SWEEP
    for k, n in shapes:
        weight = random_weight(n, k, device, gen)
        w_bf16 = weight.dequantize(torch.bfloat16).to(device)
        exact, ref_w = check_decode(weight, device)  # once per weight; each swept config checks its matmul
        checks.append({"N": n, "K": k, "M": 0, "decode_exact": exact, "ok": exact})
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(device).bfloat16()
            row = {"K": k, "N": n, "M": m, "bf16_us": timer(lambda: F.linear(x, w_bf16))}
            row["e8p_us"] = timer(lambda: e8p_linear(x, weight.codes, weight.scale))
            best = None
            for config in sweep:
                if config["path"] == "gemv" and m > 16:  # one token per program: for a few tokens only
                    continue
                if config["path"] == "dot" and config["BLOCK_M"] > max(64, 4 * m):  # tall tiles only with tokens
                    continue
                ok = check_linear(weight, ref_w, min(m, 33), device, gen, config)["ok"]
                t = timer(lambda: e8p_linear(x, weight.codes, weight.scale, None, config))
                row.setdefault("sweep", []).append({"config": config, "us": t, "ok": ok})
                if ok and (best is None or t < best[1]):
                    best = (config, t)
            row["tuned_config"], row["tuned_us"] = best if best else (None, float("nan"))
            if m >= 256:
                row["decode_us"] = timer(lambda: e8p_decode(weight.codes, weight.scale, torch.bfloat16))
                row["decode_cublas_us"] = timer(
                    lambda: F.linear(x, e8p_decode(weight.codes, weight.scale, torch.bfloat16)))
            timings.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "sweep"}), flush=True)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() + " CPU",
           "torch": torch.__version__, "launcher_tiles": {"gemv (M ≤ %d)" % GEMV_MAX_M: GEMV_TILES,
                                                      "dot (M ≤ 16)": DOT_TILES, "dot (M ≤ 64)": DOT_TILES_MID,
                                                      "dot": DOT_TILES_LARGE, "decode + cuBLAS from M": DECODE_MIN_M},
           "timer": "wall-clock median of 3 (smoke)" if ARGS.smoke else
           f"median of triton.testing.do_bench ({ARGS.warmup} ms warm-up, {ARGS.rep} ms, L2 flushed)"}
    import triton

    env["triton"] = triton.__version__
    text = markdown(env, checks, timings)
    print(text)
    out = Path(ARGS.out) if ARGS.out else (None if ARGS.smoke else RESULTS)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        card = env["device"].replace(" ", "-")
        (out / f"gpu_e8p_{card}.json").write_text(json.dumps({"env": env, "checks": checks, "timings": timings},
                                                             indent=2) + "\n")
        (out / f"gpu_e8p_{card}.md").write_text(text)


def markdown(env: dict, checks: list[dict], timings: list[dict]) -> str:
    lines = [f"# E8P kernels vs bf16 F.linear on {env['device']}", "",
             f"Measured {env['date']}: torch {env['torch']}, triton {env['triton']}; {env['timer']}. "
             "Each figure is t(bf16 F.linear) / t(kernel) (> 1: faster). The E8P weight is random codes with "
             "float16 row scales (2 bits per weight + 16 bits per row).", "",
             "| K × N | M | bf16 µs | e8p (launcher) | e8p tuned | tuned config | decode µs | decode + cuBLAS |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in timings:
        dc = f"{r['bf16_us'] / r['decode_cublas_us']:.2f}" if "decode_cublas_us" in r else "–"
        tuned = r["tuned_config"]
        tuned = "–" if tuned is None else " ".join(f"{k}={v}" for k, v in tuned.items())
        dec = f"{r['decode_us']:.1f}" if "decode_us" in r else "–"
        lines.append(f"| {r['K']} × {r['N']} | {r['M']} | {r['bf16_us']:.1f} | {r['bf16_us'] / r['e8p_us']:.2f} | "
                     f"{r['bf16_us'] / r['tuned_us']:.2f} | {tuned} | {dec} | {dc} |")
    swept = [s for r in timings for s in r.get("sweep", [])]
    passed = sum(c["ok"] for c in checks) + sum(s["ok"] for s in swept)
    lines += ["", f"Checks: {passed} of {len(checks) + len(swept)} passed (decode bit-exact in float32 and "
                  "bfloat16; float32 "
                  "relative error ≤ 1e-5, bfloat16 ≤ 8e-3, outputs poisoned)."]
    for c in checks:
        if "rel_err_float32" not in c:  # a timed shape's decode check
            lines.append(f"- N {c['N']}, K {c['K']}: decode exact {c['decode_exact']}")
            continue
        lines.append(f"- N {c['N']}, K {c['K']}, M {c['M']}: decode exact {c['decode_exact']}, rel. error float32 "
                     f"{c['rel_err_float32']:.2e}, bfloat16 {c['rel_err_bfloat16']:.2e}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
