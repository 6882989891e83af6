"""lowbit's Triton kernels beside bf16 ``F.linear`` on the LLaMA-7B and -70B linear shapes, one GPU, one run.

For each (K, N) in 4096×4096, 4096×11008, 11008×4096 (7B) and 8192×28672, 28672×8192
(70B) and each M in 1, 16, 64, 256, 2048 tokens (bfloat16 activations):

1. quantise one random normal weight per format on the GPU (int4 g128 sym, NF4 g64,
   int8 per-channel) and check every kernel against `lowbit.kernels.reference.quantized_linear`
   (|out − ref| ≤ 4 bf16 roundings of (|ref| + rms(ref)), the bound the tests use);
   torch's tinygemm int4 is checked against the same reference on the same int4 weight;
2. time each with the median of ``triton.testing.do_bench`` (warm-up first; L2 flushed
   before every repetition, so weights come from HBM as in decoding): bf16 ``F.linear``,
   ``lowbit::w4a16_triton``, ``lowbit::nf4_triton``, ``lowbit::w8a8_triton`` (activation
   quantisation included), tinygemm (``torch._weight_int4pack_mm``) and, when importable,
   bitsandbytes NF4 (``matmul_4bit``) and LLM.int8 (``Linear8bitLt``, threshold 0).

Writes bench/results/gpu_kernels_<card>.json and .md with the card from
``torch.cuda.get_device_name``; the table gives t(bf16) / t(kernel), so > 1 is faster.
do_bench times the GPU work of a call; Python dispatch overhead largely hides behind the
cache flush and is not in the figures.

``--smoke`` runs everything that can run on a CPU under TRITON_INTERPRET=1 on tiny
shapes (no tinygemm or bitsandbytes, wall-clock medians) and writes nothing unless
``--out`` names a directory outside bench/results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192)]  # (K, N)
TOKENS = [1, 16, 64, 256, 2048]
SMOKE_SHAPES = [(256, 96), (192, 160)]
SMOKE_TOKENS = [1, 16, 33]
TOL = 4 * 2.0**-8  # bf16


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", default=None, help="results directory (default bench/results; none with --smoke)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    return parser.parse_args()


ARGS = parse()
if ARGS.smoke:  # before lowbit's kernels are first launched (they are built at that moment)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.kernels.reference import quantized_linear  # noqa: E402
from lowbit.kernels.triton import (  # noqa: E402
    nf4_linear,
    prepare_nf4,
    prepare_w4a16,
    prepare_w8a8,
    w4a16_linear,
    w8a8_linear,
)
from lowbit.kernels.triton.ops import _sm_count, int4_config, w8a8_config  # noqa: E402
from lowbit.scheme import QuantSpec, get_scheme  # noqa: E402
from lowbit.tensor import quantize_weight  # noqa: E402

W4 = QuantSpec("int", 4, "group", 128)
NF4 = QuantSpec("nf4", 4, "group", 64)
W8 = get_scheme("W8A8").weights
ACT = get_scheme("W8A8").activations


def timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of one call."""
    if smoke:
        def wall(fn):
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return 1e6 * statistics.median(times)
        return wall
    import triton.testing

    return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=ARGS.warmup, rep=ARGS.rep, return_mode="median")


def error_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst |out − ref| / (TOL · (|ref| + rms(ref))); ≤ 1 passes."""
    out, ref = out.double(), ref.double()
    bound = TOL * (ref.abs() + ref.pow(2).mean().sqrt())
    ratio = ((out - ref).abs() / bound).max().item()
    return ratio if torch.isfinite(out).all() else float("inf")


def tinygemm(weight, device) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """torch's int4 tinygemm on the same symmetric int4 weight: w = (q − 8) · s + z with z = 0."""
    if device.type != "cuda":
        return "CUDA only"
    codes = (weight.codes() + 8).to(torch.int32)  # (N, K) stored codes 0..15
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2), even k in the high nibble
    w = torch._convert_weight_to_int4pack(packed, 8)
    scale = weight.scales().T  # (G, N)
    scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch._weight_int4pack_mm(x, w, weight.group_size, scales_and_zeros)


def bitsandbytes_peers(w_bf16: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor] | str]:
    import importlib.util

    if w_bf16.device.type != "cuda":
        return {"bnb nf4": "CUDA only", "bnb int8": "CUDA only"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"bnb nf4": "not installed", "bnb int8": "not installed"}
    import bitsandbytes as bnb

    peers: dict[str, Callable[[torch.Tensor], torch.Tensor] | str] = {}
    try:  # a peer whose API moved is reported, not fatal
        qw, state = bnb.functional.quantize_4bit(w_bf16, blocksize=64, quant_type="nf4")
        peers["bnb nf4"] = lambda x: bnb.matmul_4bit(x, qw.t(), quant_state=state)
    except Exception as exc:  # noqa: BLE001
        peers["bnb nf4"] = f"failed: {exc!r}"[:200]
    try:
        n, k = w_bf16.shape
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(w_bf16.cpu(), requires_grad=False, has_fp16_weights=False)
        layer = layer.to(w_bf16.device)
        peers["bnb int8"] = lambda x: layer(x)
    except Exception as exc:  # noqa: BLE001
        peers["bnb int8"] = f"failed: {exc!r}"[:200]
    return peers


def run_shape(k: int, n: int, tokens: list[int], device: torch.device, measure) -> tuple[list[dict], list[dict]]:
    gen = torch.Generator(device=device).manual_seed(k * 7 + n)
    W = torch.randn(n, k, generator=gen, device=device) * 0.02  # (N, K)
    w4, wn, w8 = (quantize_weight(W, spec) for spec in (W4, NF4, W8))
    w_bf16 = W.to(torch.bfloat16)
    del W
    p4, pn, p8 = prepare_w4a16(w4), prepare_nf4(wn), prepare_w8a8(w8)
    sms = _sm_count(device)
    ours = {
        "w4a16": (lambda x: w4a16_linear(x, p4, w4.group_size), w4, None,
                  lambda m: int4_config(m, n, k, w4.group_size, w4.scale_shape[1], sms)),
        "nf4": (lambda x: nf4_linear(x, pn, wn.group_size), wn, None,
                lambda m: int4_config(m, n, k, wn.group_size, wn.scale_shape[1], sms)),
        "w8a8": (lambda x: w8a8_linear(x, p8), w8, ACT, lambda m: w8a8_config(m, n, k, sms)),
    }
    peers: dict[str, Callable | str] = {"tinygemm int4": tinygemm(w4, device), **bitsandbytes_peers(w_bf16)}
    checks, timings = [], []
    for m in tokens:
        x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
        row = {"K": k, "N": n, "M": m, "us": {}, "skipped": {}}
        row["us"]["bf16"] = measure(lambda x=x: F.linear(x, w_bf16))
        for name, (fn, weight, act, config) in ours.items():
            ratio = error_ratio(fn(x), quantized_linear(x, weight, None, act))
            checks.append({"kernel": name, "K": k, "N": n, "M": m, "error_ratio": ratio, "passed": ratio <= 1.0,
                           "config": str(config(m))})
            row["us"][name] = measure(lambda fn=fn, x=x: fn(x))
        for name, fn in peers.items():
            if isinstance(fn, str):
                row["skipped"][name] = fn
                continue
            if name == "tinygemm int4":
                ratio = error_ratio(fn(x), quantized_linear(x, w4))
                checks.append({"kernel": name, "K": k, "N": n, "M": m, "error_ratio": ratio, "passed": ratio <= 1.0})
            row["us"][name] = measure(lambda fn=fn, x=x: fn(x))
        timings.append(row)
        print(f"K={k} N={n} M={m}: " + ", ".join(f"{key} {us:.1f} us" for key, us in row["us"].items()), flush=True)
    return checks, timings


def environment(device: torch.device) -> dict:
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() + " CPU",
           "cuda": torch.version.cuda, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
           "timer": ("wall-clock median of 3 calls (smoke: not a measurement)" if ARGS.smoke else
                     f"median of triton.testing.do_bench ({ARGS.warmup} ms warm-up, {ARGS.rep} ms of repetitions, "
                     "L2 flushed before each)")}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


def markdown(env: dict, checks: list[dict], timings: list[dict]) -> str:
    kernels = [name for name in timings[0]["us"] if name != "bf16"]
    lines = [
        f"# lowbit Triton kernels vs bf16 F.linear on {env['device']}",
        "",
        f"Measured {env['date']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"bitsandbytes {env['bitsandbytes']}. bf16 activations; each figure is t(bf16 F.linear) / t(kernel) "
        f"(> 1: faster than bf16); times: {env['timer']}.",
        "Weights: int4 g128 symmetric (w4a16, tinygemm), NF4 g64, int8 per-channel with per-token dynamic int8 "
        "activations (w8a8, quantisation included).",
        "",
        "| K × N | M | bf16 µs | " + " | ".join(kernels) + " |",
        "|---|---:|---:|" + "---:|" * len(kernels),
    ]
    for row in timings:
        bf16 = row["us"]["bf16"]
        cells = [f"{bf16 / row['us'][k]:.2f}" if k in row["us"] else "–" for k in kernels]
        lines.append(f"| {row['K']} × {row['N']} | {row['M']} | {bf16:.1f} | " + " | ".join(cells) + " |")
    skipped = {name: why for row in timings for name, why in row["skipped"].items()}
    if skipped:
        lines += ["", "Not timed: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + "."]
    failed = [c for c in checks if not c["passed"]]
    worst = max(checks, key=lambda c: c["error_ratio"])
    lines += ["", f"Correctness against the reference: {len(checks) - len(failed)} of {len(checks)} checks passed; "
              f"worst error {worst['error_ratio']:.2f}× the tolerance ({worst['kernel']}, K={worst['K']}, "
              f"N={worst['N']}, M={worst['M']})."]
    for c in failed:
        lines.append(f"- FAILED {c['kernel']} K={c['K']} N={c['N']} M={c['M']}: {c['error_ratio']:.2f}× the tolerance")
    return "\n".join(lines) + "\n"


def main() -> None:
    smoke = ARGS.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU.")
    out_dir = Path(ARGS.out) if ARGS.out else (None if smoke else RESULTS)
    if smoke and out_dir is not None and out_dir.resolve() == RESULTS.resolve():
        sys.exit("--smoke figures are not results: choose another --out.")
    device = torch.device("cpu" if smoke else "cuda")
    measure = timer(smoke)
    start = time.perf_counter()
    checks, timings = [], []
    for k, n in SMOKE_SHAPES if smoke else SHAPES:
        c, t = run_shape(k, n, SMOKE_TOKENS if smoke else TOKENS, device, measure)
        checks += c
        timings += t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = environment(device)
    env["wall_seconds"] = round(time.perf_counter() - start, 1)
    text = markdown(env, checks, timings)
    print(text)
    if out_dir is not None:
        card = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "checks": checks, "timings": timings}
        (out_dir / f"gpu_kernels_{card}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out_dir / f"gpu_kernels_{card}.md").write_text(text)
    if any(not c["passed"] for c in checks if not c["kernel"].startswith("tinygemm")):
        sys.exit("a lowbit kernel disagreed with the reference (see the table).")


if __name__ == "__main__":
    main()
