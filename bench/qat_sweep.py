"""Learning-rate sweep for QAT on the default model cut to its first layers: bench/results/qat_sweep.json and .md.

One process: the model is cut to ``--first-layers`` decoder layers (plus the final norm and the tied
head), quantised once with ``--init`` (GPTQ by default; ``--calib-samples`` × 512 tokens of
pydoc-calib), and that student is copied for every (weight lr, scale lr) pair of the grid and trained
for the same budget (``--steps`` × ``--batch-size`` × ``--seqlen`` tokens of pydoc-calib, distillation
against the cut float model); each result is converted to packed layers and evaluated on the first
``--windows`` 2048-token windows of pydoc-eval (KL and top-1 against the cut float model). KL is
what to read: a cut model's perplexity means nothing as a language-model figure.

Each run also picks the step-size gradient (``QAT.scale_grad``: ``lsq`` or ``exact``) and what trains
(``QAT.train``: ``all`` or ``quant-params``, the codes frozen): ``--modes`` crosses modes with the lr grid,
``--runs`` lists exact runs as ``scale_grad/train/lr/scale_lr`` separated by commas (a ``quant-params`` run
has no weight lr to speak of; give any).

    python bench/qat_sweep.py [--scheme W2A16] [--lrs 1e-5,3e-5,1e-4] [--scale-lrs 1e-5,1e-4,1e-3]
                              [--modes lsq/all,exact/quant-params,exact/all]
                              [--runs lsq/all/1e-5/1e-4,exact/quant-params/0/1e-3]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from qat import RESULTS, evaluate, load1  # noqa: E402

import lowbit  # noqa: E402
from lowbit.calibration import tokenize  # noqa: E402
from lowbit.eval import EvalConfig, reference_stats  # noqa: E402
from lowbit.report import versions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", default="W2A16")
    parser.add_argument("--init", default="gptq", choices=["gptq", "rtn"])
    parser.add_argument("--first-layers", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4")
    parser.add_argument("--scale-lrs", default="1e-5,1e-4,1e-3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--modes", default="lsq/all", help="scale_grad/train pairs crossed with --lrs × --scale-lrs")
    parser.add_argument("--runs", default=None, help="explicit scale_grad/train/lr/scale_lr runs (replaces the grid)")
    parser.add_argument("--name", default="qat_sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.runs:
        grid = []
        for spec in args.runs.split(","):
            scale_grad, train, lr, scale_lr = spec.split("/")
            grid.append((scale_grad, train, float(lr), float(scale_lr)))
    else:
        grid = [(*mode.split("/"), float(lr), float(scale_lr)) for mode in args.modes.split(",")
                for lr in args.lrs.split(",") for scale_lr in args.scale_lrs.split(",")]
    torch.manual_seed(0)
    model = lowbit.load_model()
    model.model.layers = model.model.layers[:args.first_layers]
    model.config.num_hidden_layers = args.first_layers
    tokenizer = lowbit.load_tokenizer()
    eval_tokens = tokenize(tokenizer, lowbit.load_text("pydoc-eval"))
    train_tokens = tokenize(tokenizer, lowbit.load_text("pydoc-calib"))
    eval_config = EvalConfig(max_windows=args.windows, kl_windows=args.windows)
    ref = reference_stats(model, eval_tokens, eval_config)
    scheme = lowbit.scheme.get_scheme(args.scheme)
    calib = lowbit.calibration_set("pydoc-calib", n=args.calib_samples, seqlen=512, tokenizer=tokenizer)
    init = lowbit.GPTQ() if args.init == "gptq" else lowbit.RTN()
    start = time.perf_counter()
    student = lowbit.prepare_qat(model, scheme, init=init, calib=calib if args.init == "gptq" else None)
    init_seconds = time.perf_counter() - start
    rows = [{"lr": None, "scale_lr": None, "init_seconds": init_seconds,
             **evaluate(lowbit.convert(student), eval_tokens, ref, "init", eval_config)}]
    print(f"{args.init}: KL {rows[0]['kl']:.5f}", flush=True)
    meta = {"versions": versions(), "scheme": scheme.describe(), "init": args.init, "first_layers": args.first_layers,
            "calib_samples": args.calib_samples, "steps": args.steps, "batch_size": args.batch_size,
            "seqlen": args.seqlen, "windows": args.windows}
    out = RESULTS / f"{args.name}.json"
    for scale_grad, train, lr, scale_lr in grid:
        config = lowbit.QAT(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=lr,
                            scale_lr=scale_lr, warmup=2, scale_grad=scale_grad, train=train)
        trial = copy.deepcopy(student)
        load = load1()
        head = {"scale_grad": scale_grad, "train": train, "lr": lr if train == "all" else None, "scale_lr": scale_lr}
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = lowbit.train_qat(trial, train_tokens, config, teacher=model, checkpoint_dir=tmp)
            except lowbit.LowbitError as err:  # a diverged run is a result of the sweep, not a crash
                rows.append({**head, "error": str(err)})
                continue
        row = {**head, "train_seconds": report.seconds, "train_cpu_seconds": report.cpu_seconds, "load": load,
               "load_end": load1(), "losses": report.losses,
               **evaluate(lowbit.convert(trial), eval_tokens, ref, f"{scale_grad}/{train} {lr:g}/{scale_lr:g}",
                          eval_config)}
        rows.append(row)
        print(f"{scale_grad}/{train} lr {lr:g} scale_lr {scale_lr:g}: KL {row['kl']:.5f}, loss "
              f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}", flush=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    v = meta["versions"]
    init = rows[0]
    lines = [f"# QAT learning-rate sweep: {meta['scheme']}, {meta['init'].upper()} init, default model CUT TO ITS "
             f"FIRST {meta['first_layers']} DECODER LAYERS", "",
             f"Measured {v['date']} on {v['machine']}, torch {v['torch']} ({v['torch_threads']} threads). "
             f"Init calibration {meta['calib_samples']} × 512 tokens of pydoc-calib; every QAT run: {meta['steps']} "
             f"AdamW steps × {meta['batch_size']} × {meta['seqlen']} tokens of pydoc-calib, distillation against the cut "
             f"float model, cosine schedule, warm-up 2, clip 1.0, AdamW betas (0.9, 0.95), eps 1e-8. Scale gradient "
             f"`lsq`: LSQ's straight-through round(w/s) − w/s; `exact`: ∂ŵ/∂s = q − z with the codes fixed "
             f"(EfficientQAT E2E-QP); train `quant-params`: codes frozen, only scales and zero points train. KL and top-1 against the cut float model on the first "
             f"{meta['windows']} 2048-token window(s) of pydoc-eval (a cut model's perplexity is meaningless).", "",
             f"{meta['init'].upper()} alone: KL {init['kl']:.5f}, top-1 {init['top1']:.2f}%.", "",
             "| scale grad | trains | weight lr | scale lr | KL | share of init's KL recovered | top-1 % | "
             "loss first → last | train s | load |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows[1:]:
        lr = "—" if r.get("lr") is None else f"{r['lr']:g}"
        mode = f"| {r.get('scale_grad', 'lsq')} | {r.get('train', 'all')} | {lr} | {r['scale_lr']:g} |"
        if "error" in r:
            lines.append(f"{mode} diverged | | | {r['error']} | | |")
            continue
        lines.append(f"{mode} {r['kl']:.5f} | {100 * (1 - r['kl'] / init['kl']):+.1f}% | "
                     f"{r['top1']:.2f} | {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} | {r['train_seconds']:.0f} | "
                     f"{r['load']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
