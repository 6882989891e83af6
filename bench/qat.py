"""QAT against post-training quantisation: bench/results/qat.json and qat.md.

On the default model, for W3A16 (int3 asym g128) and W2A16 (int2 asym g64): RTN and GPTQ
(PROTOCOL.md calibration: 128 × 512 tokens of pydoc-calib, random.Random(0)), then QAT with
the distillation loss KL(FP ‖ student) initialised from each, for a fixed budget of training
tokens drawn from pydoc-calib. Every model is evaluated on pydoc-eval as PROTOCOL.md says
(perplexity over its 2048-token windows, KL and top-1 against the float model over the first
4) — the QAT models after `lowbit.convert`, i.e. as packed QuantLinear layers. One process:
the float model is loaded and its reference statistics computed once. The machine is shared:
the 1-minute load average is recorded beside every timing.

    python bench/qat.py [--schemes W3A16,W2A16] [--inits rtn,gptq] [--steps 32] [--batch-size 4]
                        [--seqlen 256] [--lr 1e-4] [--scale-lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lowbit  # noqa: E402
from lowbit.calibration import tokenize  # noqa: E402
from lowbit.cli import peak_rss_bytes, versions  # noqa: E402
from lowbit.eval import EvalConfig, reference_stats  # noqa: E402
from lowbit.eval.metrics import evaluate_tokens  # noqa: E402
from lowbit.footprint import model_footprint  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def evaluate(model, tokens, ref, label: str, config: EvalConfig) -> dict:
    start, cpu, load = time.perf_counter(), time.process_time(), load1()
    result = evaluate_tokens(model, tokens, ref, config, desc=f"eval {label}")
    return {**result.to_dict(), "eval_seconds": time.perf_counter() - start,
            "eval_cpu_seconds": time.process_time() - cpu, "eval_load_start": load,
            "eval_load_end": load1(), "bits_per_weight": model_footprint(model).bits_per_weight}


def _cell(value: float | None, fmt: str = ".1f") -> str:
    """A measured figure, or an empty cell where the row has none (never a 0 that was not measured)."""
    return "" if value is None else format(value, fmt)


def markdown(rows: list[dict], meta: dict) -> str:
    v = meta["versions"]
    cfg = meta["config"]
    lines = [
        "# QAT vs post-training quantisation (SmolLM2-135M-Instruct"
        + (f" CUT TO ITS FIRST {meta['first_layers']} DECODER LAYERS" if meta.get("first_layers") else "")
        + f", pydoc-eval, {rows[0]['tokens']:,} predicted tokens)",
        "",
        f"Measured {v['date']} on {v['machine']} (shared with other jobs: load averages below), torch {v['torch']} "
        f"({v['torch_threads']} threads), transformers {v['transformers']}, lowbit {v['lowbit']}. "
        f"FP perplexity {rows[0]['reference_ppl']:.4f}.",
        "",
        f"QAT budget per run: {cfg['steps']} AdamW steps × {cfg['batch_size']} × {cfg['seqlen']} tokens = "
        f"{cfg['steps'] * cfg['batch_size'] * cfg['seqlen'] * cfg['grad_accum']:,} training tokens of pydoc-calib "
        f"(windows drawn by seed {cfg['seed']}), loss {cfg['loss']} (KL(FP ‖ student), T = {cfg['temperature']}), "
        f"lr {cfg['lr']:g} for latent weights and {cfg['scale_lr']:g} for LSQ scales and zero points, {cfg['schedule']} "
        f"schedule, warm-up {cfg['warmup']}, gradient clip {cfg['max_grad_norm']}, {meta['dtype']} autocast; only "
        "the quantised linears' weights, scales and zero points train. GPTQ: act-order, static groups "
        f"(lowbit's default), {meta.get('calib_samples', 128)} × 512 calibration tokens"
        + ("" if meta.get("calib_samples", 128) == 128 else " (PROTOCOL.md: 128)") + ". Evaluation: perplexity over "
        f"the first {meta.get('eval', {}).get('max_windows', 16)} windows of 2048 tokens, KL and top-1 over the first "
        f"{meta.get('eval', {}).get('kl_windows', 4)}"
        + ("" if meta.get("eval", {}).get("max_windows", 16) == 16 and meta.get("eval", {}).get("kl_windows", 4) == 4
           else " — a REDUCED protocol (PROTOCOL.md: all windows up to 16, KL over 4), chosen to finish on a machine "
                "shared at load 20-30") + ".",
        "",
        "Wall times are inflated by the other jobs on this machine; the CPU time of the training process divided by "
        "its threads is what the run would take alone.",
        "",
        "| scheme | method | bits/weight | ppl | Δppl | KL | top-1 % | share of PTQ's KL recovered | "
        "init s | train s (wall) | train CPU s / threads | tokens/s | load (1-min) during training | eval s (load) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        share = ""
        if r.get("from_kl") is not None:
            share = f"{100 * (1 - r['kl'] / r['from_kl']):.1f}%"
        train = r.get("train") or {}
        lines.append(
            f"| {r['scheme']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl']:.4f} | "
            f"{100 * (r['ppl'] / r['reference_ppl'] - 1):+.2f}% | {r['kl']:.5f} | {r['top1']:.2f} | {share} | "
            f"{_cell(r.get('init_seconds'))} | {_cell(train.get('seconds'))} | "
            f"{_cell(train['cpu_seconds'] / v['torch_threads'] if 'cpu_seconds' in train else None)} | "
            f"{_cell(train.get('tokens_per_second'))} | "
            + (f"{train['load_start']} → {train['load_end']}" if train else "") + " | "
            f"{r['eval_seconds']:.0f} ({r['eval_load_start']}) |"
        )
    losses = [r for r in rows if r.get("train")]
    if losses:
        lines += ["", "Training loss (distillation KL per token) at the first and last steps:", ""]
        for r in losses:
            curve = r["train"]["losses"]
            lines.append(f"- {r['scheme']} {r['method']}: {curve[0]:.4f} → {curve[-1]:.4f} "
                         f"(mean of last 4: {sum(curve[-4:]) / len(curve[-4:]):.4f})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="W3A16,W2A16")
    parser.add_argument("--inits", default="gptq,rtn")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scale-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="qat")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the qat.json files of runs made separately (e.g. one scheme each) into --out")
    parser.add_argument("--windows", type=int, default=None,
                        help="evaluate on only the first N windows (ppl and KL) instead of PROTOCOL.md's 16 / 4: a "
                             "reduced protocol, said so in the results")
    parser.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration sequences of 512 tokens")
    parser.add_argument("--first-layers", type=int, default=None,
                        help="cut the model to its first N decoder layers (a cut-model check, said so in the results)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script end to end in minutes: 2 decoder layers, 1 eval window (not a result)")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [row for run in runs for row in run["rows"]]
        meta = {**runs[0]["meta"], "runs": [run["meta"] for run in runs]}
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / f"{args.name}.md").write_text(markdown(rows, meta))
        print(markdown(rows, meta))
        return
    config = lowbit.QAT(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr,
                        scale_lr=args.scale_lr, warmup=args.warmup)
    model = lowbit.load_model()
    eval_config = EvalConfig()
    layers = 2 if args.smoke else args.first_layers
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    if args.smoke:
        eval_config = EvalConfig(max_windows=1, kl_windows=1)
    if args.windows:
        eval_config = EvalConfig(max_windows=args.windows, kl_windows=args.windows)
    tokenizer = lowbit.load_tokenizer()
    eval_tokens = tokenize(tokenizer, lowbit.load_text("pydoc-eval"))
    train_tokens = tokenize(tokenizer, lowbit.load_text("pydoc-calib"))
    ref = reference_stats(model, eval_tokens, eval_config)
    calib = None
    from lowbit.sequential import calibration_dtype

    meta = {"versions": versions(), "config": config.to_dict(), "eval": vars(eval_config).copy(),
            "calib_samples": args.calib_samples, "first_layers": layers,
            "dtype": str(calibration_dtype(config.dtype, torch.device("cpu"))).replace("torch.", "")}
    rows: list[dict] = []

    def write() -> None:
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / f"{args.name}.md").write_text(markdown(rows, meta))

    # init-major: the best post-training method's pairs first, so a cut-short run still has them
    for init_name in args.inits.split(","):
        for scheme_name in args.schemes.split(","):
            scheme = lowbit.scheme.get_scheme(scheme_name)
            init = lowbit.GPTQ() if init_name == "gptq" else lowbit.RTN()
            if init_name == "gptq" and calib is None:
                calib = lowbit.calibration_set("pydoc-calib", n=8 if args.smoke else args.calib_samples, seqlen=512,
                                               tokenizer=tokenizer)
            label = init.to_dict()["name"].upper()
            start, cpu, load = time.perf_counter(), time.process_time(), load1()
            student = lowbit.prepare_qat(model, scheme, init=init, calib=calib)
            init_seconds, init_cpu = time.perf_counter() - start, time.process_time() - cpu
            ptq = lowbit.convert(student)
            row = {"scheme": scheme.describe(), "method": label, "init_seconds": init_seconds, "init_cpu_seconds": init_cpu,
                   "init_load": load,
                   **evaluate(ptq, eval_tokens, ref, f"{scheme_name} {label}", eval_config)}
            del ptq
            rows.append(row)
            write()
            print(row, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                load = load1()
                report = lowbit.train_qat(student, train_tokens, config, teacher=model, checkpoint_dir=tmp)
                train = {**report.to_dict(), "load_start": load, "load_end": load1()}
            quantized = lowbit.convert(student)
            del student
            qrow = {"scheme": scheme.describe(), "method": f"QAT from {label}", "from_kl": row["kl"],
                    "from_ppl": row["ppl"], "train": train,
                    **evaluate(quantized, eval_tokens, ref, f"{scheme_name} QAT {label}", eval_config)}
            del quantized
            rows.append(qrow)
            meta["peak_rss_bytes"] = peak_rss_bytes()
            write()
            print({k: v for k, v in qrow.items() if k != "train"}, flush=True)
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
