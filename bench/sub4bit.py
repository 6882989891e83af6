"""Below 4 bits on the default model: RTN, GPTQ, GPTQ + incoherence, QuIP#'s E8P codebook; W4A8 / W4A4.

    python bench/sub4bit.py --rows e8p,gptq-w2pc,...   # rows run in this process, JSON per row
    python bench/sub4bit.py --tabulate                 # bench/results/sub4bit.md from the row files

Each process loads the model, the calibration set (pydoc-calib, ``--calib-samples`` × 512
tokens, random.Random(0) offsets as PROTOCOL.md says) and the float reference's statistics
on pydoc-eval once, then for each row quantises, evaluates (PROTOCOL.md: ppl over 16 windows
of 2048 tokens, ``--windows`` fewer when the machine is too loaded; KL / top-1 over the first 4)
and writes bench/results/sub4bit_rows/<row>.json
at once, so rows can run in several processes side by side and a killed run keeps its rows.

Bits per weight count everything stored for the quantised linears: codes, scales, zero
points, the incoherence transforms' sign bits, and E8P's 256 × 8 source table.

"KV" rows also quantise attention's keys and values per token and head (`lowbit.kv_cache`), with a
Hadamard over the head dimension when the row has rotations. "+ rotations" rows for activations wrap each linear in the randomised Hadamard transforms of
`lowbit.nn.incoherent` (y = Uᵀ Q(U W Vᵀ) Q_act(V x)): the per-token activation quantiser
sees the rotated input V x (one online transform per linear). "+ QuaRot" rows fold a
randomised Hadamard rotation of the residual stream into the weights (`lowbit.rotation`,
RMSNorm weights folded first) and add an online Hadamard before each down projection.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ROWS_DIR = RESULTS / "sub4bit_rows"


def _spec(bits: int, group: int | None, symmetric: bool = False):
    from lowbit.scheme import QuantSpec

    if group is None:
        return QuantSpec("int", bits, "channel", symmetric=symmetric)
    return QuantSpec("int", bits, "group", group, symmetric=symmetric)


def _act(bits: int):
    from lowbit.scheme import QuantSpec

    return QuantSpec("int", bits, "token", dynamic=True, scale_dtype="float32")


# row name → (label, weight spec args, activation bits or None, method, incoherence)
ROWS: dict[str, tuple[str, tuple, int | None, str, bool | str]] = {
    "rtn-w2pc": ("int2 asym per-channel, RTN", (2, None), None, "rtn", False),
    "rtn-w2pc-inc": ("int2 asym per-channel, RTN + incoherence", (2, None), None, "rtn", True),
    "gptq-w2pc": ("int2 asym per-channel, GPTQ", (2, None), None, "gptq", False),
    "gptq-w2pc-inc": ("int2 asym per-channel, GPTQ + incoherence", (2, None), None, "gptq", True),
    "rtn-w2g64": ("int2 asym g64, RTN", (2, 64), None, "rtn", False),
    "gptq-w2g64": ("int2 asym g64, GPTQ", (2, 64), None, "gptq", False),
    "gptq-w2g64-inc": ("int2 asym g64, GPTQ + incoherence", (2, 64), None, "gptq", True),
    "e8p": ("E8P codebook (QuIP#) + incoherence, LDLQ", (), None, "e8p", True),
    "rtn-w3g128": ("int3 asym g128, RTN", (3, 128), None, "rtn", False),
    "gptq-w3g128": ("int3 asym g128, GPTQ", (3, 128), None, "gptq", False),
    "gptq-w3g128-inc": ("int3 asym g128, GPTQ + incoherence", (3, 128), None, "gptq", True),
    "rtn-w3pc": ("int3 asym per-channel, RTN", (3, None), None, "rtn", False),
    "gptq-w3pc": ("int3 asym per-channel, GPTQ", (3, None), None, "gptq", False),
    "gptq-w3pc-inc": ("int3 asym per-channel, GPTQ + incoherence", (3, None), None, "gptq", True),
    "rtn-w4a16": ("W4A16 int4 sym g128, RTN", (4, 128, True), None, "rtn", False),
    "rtn-w4a8": ("W4A8 (int8 per-token), RTN", (4, 128, True), 8, "rtn", False),
    "rtn-w4a8-rot": ("W4A8 (int8 per-token), RTN + rotations", (4, 128, True), 8, "rtn", True),
    "rtn-w4a4": ("W4A4 (int4 per-token), RTN", (4, 128, True), 4, "rtn", False),
    "rtn-w4a4-rot": ("W4A4 (int4 per-token), RTN + rotations", (4, 128, True), 4, "rtn", True),
    "rtn-w4a8-quarot": ("W4A8 (int8 per-token), RTN + QuaRot residual rotation", (4, 128, True), 8, "rtn", "quarot"),
    "rtn-w4a4-quarot": ("W4A4 (int4 per-token), RTN + QuaRot residual rotation", (4, 128, True), 4, "rtn", "quarot"),
    "gptq-w4a16": ("W4A16 int4 sym g128, GPTQ", (4, 128, True), None, "gptq", False),
    "gptq-w4a8-rot": ("W4A8 (int8 per-token), GPTQ + rotations", (4, 128, True), 8, "gptq", True),
    "gptq-w4a4-rot": ("W4A4 (int4 per-token), GPTQ + rotations", (4, 128, True), 4, "gptq", True),
    # KV cache quantised too (lowbit.kv_cache: int per token and head; Hadamard over the head dim with rotations)
    "gptq-w4a8-kv8": ("W4A8 + KV8, GPTQ", (4, 128, True), 8, "gptq", False),
    "gptq-w4a8-rot-kv8": ("W4A8 + KV8, GPTQ + rotations", (4, 128, True), 8, "gptq", True),
    "gptq-w4a8-kv4": ("W4A8 + KV4, GPTQ", (4, 128, True), 8, "gptq", False),
    "gptq-w4a8-rot-kv4": ("W4A8 + KV4, GPTQ + rotations", (4, 128, True), 8, "gptq", True),
    "gptq-w4a4-rot-kv4": ("W4A4 + KV4, GPTQ + rotations", (4, 128, True), 4, "gptq", True),
}
KV_BITS = {name: int(name.rsplit("kv", 1)[1]) for name in ROWS if "-kv" in name}


def run_rows(names: list[str], calib_samples: int, smoke: bool, windows: int) -> None:
    import lowbit
    from lowbit.calibration import load_text, tokenize
    from lowbit.cli import versions
    from lowbit.eval import EvalConfig, reference_stats
    from lowbit.kv_cache import KVQuant, quantize_kv_cache
    from lowbit.quip import E8P, quantize_e8p, quantize_incoherent
    from lowbit.rotation import rotate_model
    from lowbit.scheme import Scheme

    model, tokenizer = lowbit.load_model(), lowbit.load_tokenizer()
    seqlen, config = 512, EvalConfig(max_windows=windows, kl_windows=min(4, windows))
    if smoke:  # a quick check that every row runs: 2 layers, a few tokens, one window
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        seqlen, config = 64, EvalConfig(max_windows=1, kl_windows=1)
    calib = lowbit.calibration_set("pydoc-calib", n=calib_samples, seqlen=seqlen, tokenizer=tokenizer)
    tokens = tokenize(tokenizer, load_text("pydoc-eval"))
    reference = {"pydoc-eval": reference_stats(model, tokens, config, progress=False)}
    out_dir = ROWS_DIR if not smoke else ROWS_DIR / "smoke"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        label, wargs, abits, method_name, incoherent = ROWS[name]
        print(f"== {name}: {label}", flush=True)
        load_before = _load()
        start = time.perf_counter()
        if method_name == "e8p":
            q = quantize_e8p(model, calib, E8P(), progress=True)
        else:
            scheme = Scheme(_spec(*wargs), activations=_act(abits) if abits else None, name=name)
            method = lowbit.GPTQ() if method_name == "gptq" else lowbit.RTN()
            use = calib if method_name == "gptq" else None
            if incoherent == "quarot":
                rotated = rotate_model(copy.deepcopy(model), seed=0)
                q = lowbit.quantize(rotated, scheme, method, use, inplace=True, progress=True)
            elif incoherent:
                q = quantize_incoherent(model, scheme, method, use, seed=0, progress=True)
            else:
                q = lowbit.quantize(model, scheme, method, use, progress=True)
        seconds = time.perf_counter() - start
        kv = KVQuant(KV_BITS[name], rotate=bool(incoherent)) if name in KV_BITS else None
        if kv is not None:
            quantize_kv_cache(q, kv)
        report = lowbit.evaluate(q, reference=reference, text="pydoc-eval", tokenizer=tokenizer, config=config,
                                 progress=False)
        print(report, flush=True)
        row = {"row": name, "label": label, **report.to_dict(), "quantize_seconds": seconds,
               "method": q.lowbit_info.method, "scheme": q.lowbit_info.scheme.to_dict(),
               "calibration": f"{calib_samples} x {seqlen} tokens" if method_name != "rtn" else None,
               "eval_windows": config.max_windows,
               "load_1min": [load_before, _load()], "versions": versions(),
               "details": {k: v for k, v in q.lowbit_info.details.items() if k in ("incoherence", "layer_errors")}}
        if kv is not None:
            row["kv_cache"] = kv.describe()
            quantize_kv_cache(q, KVQuant(None, rotate=False))  # the float model may share q's config
        (out_dir / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
        del q


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def tabulate(note: str = "") -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(ROWS_DIR.glob("*.json"))}
    if not rows:
        raise SystemExit(f"no rows in {ROWS_DIR}")
    first = next(iter(rows.values()))
    v = first["versions"]
    full = [r for r in rows.values() if r.get("eval_windows", 16) == 16] or [first]
    ref, ref_windows = full[0]["reference_ppl"]["pydoc-eval"], full[0].get("eval_windows", 16)
    calibs = sorted({r["calibration"] for r in rows.values() if r.get("calibration")})
    windows = sorted({r.get("eval_windows", 16) for r in rows.values()})
    days = sorted({r["versions"]["date"][:10] for r in rows.values()})
    lines = [
        "# Below 4 bits on SmolLM2-135M-Instruct (pydoc-eval)",
        "",
        f"Measured {', '.join(days)} on {v['machine']}, torch {v['torch']} ({v['torch_threads']} threads), "
        f"lowbit {v['lowbit']} (each row's time in its JSON, bench/results/sub4bit_rows/). The machine is shared: "
        "the 1-minute load average before/after each row is given, and quantisation times grow with it. "
        f"FP perplexity {ref:.4f} over {ref_windows} windows (each row's Δppl is against the FP perplexity of its "
        f"own windows). Calibration of the calibrated rows: {' or '.join(calibs) or 'none'} of "
        "pydoc-calib (PROTOCOL.md: 128 × 512); perplexity over the first "
        f"{' or '.join(str(w) for w in windows)} windows of 2048 tokens (PROTOCOL.md: 16), KL and top-1 over "
        "the first 4 as the protocol says.",
        "Bits per weight: codes, scales, zero points, incoherence sign bits and E8P's table, over the quantised "
        "linears (lm_head and embeddings stay float).",
        "",
        "| row | setting | bits/weight | ppl | Δppl | KL | top-1 % | quantise s | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in ROWS:
        if name not in rows:
            continue
        r = rows[name]
        ppl, own = r["ppl"]["pydoc-eval"], r["reference_ppl"]["pydoc-eval"]  # Δ against the same windows' FP ppl
        load = "/".join(f"{x:.1f}" for x in r["load_1min"])
        lines.append(f"| {name} | {r['label']} | {r['bits_per_weight']:.3f} | {ppl:.3f} | {100 * (ppl / own - 1):+.1f}% "
                     f"| {r['kl']:.4f} | {r['top1']:.2f} | {r['quantize_seconds']:.0f} | {load} |")
    missing = [n for n in ROWS if n not in rows]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated rows: {', '.join(ROWS)}")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration sequences of 512 tokens "
                        "(PROTOCOL.md: 128)")
    parser.add_argument("--windows", type=int, default=16,
                        help="2048-token evaluation windows for ppl (PROTOCOL.md: 16; KL always on the first 4)")
    parser.add_argument("--smoke", action="store_true", help="2 layers, tiny calibration and evaluation")
    parser.add_argument("--tabulate", action="store_true", help="only rewrite sub4bit.md from the row files")
    parser.add_argument("--note", default="", help="a paragraph under the table (with --tabulate)")
    args = parser.parse_args()
    if args.tabulate:
        table = tabulate(args.note)
        (RESULTS / "sub4bit.md").write_text(table)
        print(table)
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    torch.manual_seed(0)
    run_rows(names, args.calib_samples, args.smoke, args.windows)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent / "src"))
    main()
