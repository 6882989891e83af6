"""Outliers: AWQ and SmoothQuant on the default model, beside RTN, GPTQ and llm-compressor.

    python bench/outliers.py [--only W4,W3,W8A8,FP8,llmc] [--llmc-python /work/llmc-venv/bin/python]

Rows, each `lowbit quantize default ...` as a user runs it (PROTOCOL.md calibration:
128 × 512 tokens of pydoc-calib unless the label says otherwise; evaluation on pydoc-eval):
- W4A16 g128 (int4 sym) and W3A16 g128 (int3 asym): RTN, GPTQ, AWQ, AWQ+GPTQ;
- W8A8 (int8 per channel, dynamic per-token int8 activations): naive RTN, SmoothQuant
  (α = 0.5), SmoothQuant+GPTQ; FP8 (e4m3, per-token activations) naive and smoothed;
- llm-compressor's AWQ (W4A16_ASYM, group 64: it refuses group 128 on 576-wide layers)
  and SmoothQuant W8A8 (α = 0.5, then per-channel int8 weights), on the same calibration
  tokens, beside lowbit's at the same settings (``--awq-samples``: llm-compressor's AWQ
  reruns the parent module over every cached token for each grid point and mapping, hours
  on 2 cores at 128 sequences, so the AWQ pair may use fewer). Its models are evaluated by lowbit's
  evaluator: its whole state (norms it scaled included) is loaded into the float model,
  and for W8A8 its on-grid weights are wrapped in lowbit's W8A8 module, so activations go
  through the same per-token int8 quantisation as lowbit's.

Also writes outliers_activations.png: per-channel max |x| at one layer's down_proj input
(the tensor with the strongest outliers on this model) before and after smoothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _runner import RESULTS, run_setting  # noqa: E402

CALIB = ["--calib-samples", "128", "--calib-seqlen", "512"]
_WEIGHT_ONLY = (("RTN", []), ("GPTQ", ["--method", "gptq"]), ("AWQ", ["--method", "awq"]),
                ("AWQ+GPTQ", ["--method", "awq+gptq"]))
SETTINGS: list[tuple[str, list[str]]] = [  # in the order they run: the slowest rows last
    *[(f"W4A16 g128, {label}", ["--scheme", "W4A16", *args]) for label, args in _WEIGHT_ONLY],
    ("W8A8, naive (RTN)", ["--scheme", "W8A8"]),
    ("W8A8, SmoothQuant", ["--scheme", "W8A8", "--method", "smoothquant"]),
    ("W8A8, SmoothQuant+GPTQ", ["--scheme", "W8A8", "--method", "smoothquant+gptq"]),
    ("FP8, naive (RTN)", ["--scheme", "FP8"]),
    *[(f"W3A16 g128, {label}", ["--scheme", "W3A16", *args]) for label, args in _WEIGHT_ONLY],
    ("FP8, SmoothQuant", ["--scheme", "FP8", "--method", "smoothquant"]),
]

LLMC_SIDE = r'''
import json, sys, time
import torch
from safetensors.torch import load_file, save_file
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
import llmcompressor

model_dir, calib_file, out_file, which = sys.argv[1:5]
tokens = load_file(calib_file)["input_ids"]
data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if which == "awq":
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    # 0.14.0.1's AWQ pins its cached activations unconditionally, which raises without an accelerator;
    # pinning only speeds up host-to-GPU copies, so on this CPU-only machine it is skipped.
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=64))
    recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
else:
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    recipe = [SmoothQuantModifier(smoothing_strength=0.5),
              QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])]
start = time.perf_counter()
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=tokens.shape[0],
        max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
# After oneshot the modules still hold float weights beside weight_scale / weight_zero_point (the
# quantisation is applied in their forward, or when saved compressed): take the on-grid weights.
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
for module in model.modules():
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
        with torch.no_grad():
            module.weight.data = fake_quantize(module.weight, module.weight_scale,
                                               getattr(module, "weight_zero_point", None), scheme.weights)
state = {k: v.detach().float().clone() for k, v in model.state_dict().items()
         if (k.endswith(".weight") or k.endswith(".bias")) and not k.startswith("lm_head")}  # lm_head: tied
row = state["model.layers.0.mlp.down_proj.weight"][0]  # 1536 inputs: a float row has ~1536 distinct values
levels = 16 * (row.numel() // 64) if which == "awq" else 256  # 4-bit codes per group of 64; int8 per channel
assert row.unique().numel() <= levels, "llm-compressor's weights are not on its quantisation grid"
save_file(state, out_file)
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "version": llmcompressor.__version__}))
'''


class InProcess:
    """The rows in this one process: the model, calibration set and the float reference's statistics are made
    once (a row then costs its quantisation and one evaluation; on a shared 2-core machine the per-row process
    of `_runner` spends most of its time loading and re-running the reference). Same evaluator, same figures."""

    def __init__(self) -> None:
        import lowbit
        from lowbit.calibration import load_text, tokenize
        from lowbit.eval import reference_stats

        self.model, self.tokenizer = lowbit.load_model(), lowbit.load_tokenizer()
        self.calib = lowbit.calibration_set("pydoc-calib", n=128, seqlen=512, tokenizer=self.tokenizer)
        tokens = tokenize(self.tokenizer, load_text("pydoc-eval"))
        self.reference = {"pydoc-eval": reference_stats(self.model, tokens, progress=False)}

    def row(self, label: str, args: list[str]) -> dict:
        import lowbit
        from lowbit.cli import _method, build_scheme, versions

        opts = dict(zip(args[::2], args[1::2]))
        group = int(opts["--group-size"]) if "--group-size" in opts else None
        scheme = build_scheme(opts["--scheme"], group, False, None, None)
        method = _method(opts.get("--method", "rtn"))
        print(f"== {label} (in process)", flush=True)
        start = time.perf_counter()
        q = lowbit.quantize(self.model, scheme, method, calib=self.calib if method.needs_calibration else None,
                            progress=False)
        report = lowbit.evaluate(q, reference=self.reference, text="pydoc-eval", tokenizer=self.tokenizer,
                                 progress=False)
        print(report, flush=True)
        return {"label": label, "model": "default", "scheme": scheme.to_dict(), "method": method.to_dict(),
                **report.to_dict(), "quantize_seconds": q.lowbit_info.seconds, "details": q.lowbit_info.details,
                "versions": versions(), "wall_seconds": time.perf_counter() - start, "in_process": True}


def llmc_row(python: str, which: str, work: Path, samples: int) -> dict:
    """Run llm-compressor in its venv on ``samples`` × 512 calibration tokens, then evaluate its weights
    with lowbit's evaluator."""
    import lowbit
    from lowbit.cli import versions
    from lowbit.models.loading import _ensure_gguf_cache, resolve_source
    from safetensors.torch import load_file, save_file

    calib_file = work / f"calib-{samples}.safetensors"
    if not calib_file.exists():
        calib = lowbit.calibration_set("pydoc-calib", n=samples, seqlen=512, tokenizer=lowbit.load_tokenizer())
        save_file({"input_ids": calib}, str(calib_file))
    (work / "llmc_side.py").write_text(LLMC_SIDE)
    out = work / f"llmc-{which}.safetensors"
    done = subprocess.run([python, str(work / "llmc_side.py"), str(_ensure_gguf_cache(resolve_source(None))),
                           str(calib_file), str(out), which], check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    model = lowbit.load_model()
    missing = [k for k in load_file(str(out)) if k not in dict(model.named_parameters())]
    model.load_state_dict(load_file(str(out)), strict=False)
    if which == "sq":  # the on-grid int8 weights inside lowbit's W8A8 module: same activation quantisation
        model = lowbit.quantize(model, lowbit.W8A8, progress=False)
    report = lowbit.evaluate(model, reference=lowbit.load_model(), text="pydoc-eval", progress=False)
    row.update(report.to_dict(), unexpected_keys=missing, versions=versions())
    return row


def activation_plot(path: Path, layer_index: int = 2) -> dict:
    """Per-channel max |x| at down_proj's input of one layer, before and after SmoothQuant's α = 0.5 scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import lowbit
    from lowbit.algorithms.smoothquant import smoothquant_scale, weight_column_max
    from lowbit.calibration.pipeline import capture_first_layer_inputs, run_layer

    model = lowbit.load_model()
    calib = lowbit.calibration_set("pydoc-calib", n=16, seqlen=512, tokenizer=lowbit.load_tokenizer())
    _, layers, inputs = capture_first_layer_inputs(model, calib, 4)
    for layer in layers[:layer_index]:
        inputs = type(inputs)(run_layer(layer, inputs), inputs.kwargs)
    down = layers[layer_index].mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).abs().amax(0)))
    run_layer(layers[layer_index], inputs)
    handle.remove()
    before = torch.stack(seen).amax(0)
    s = smoothquant_scale(before, weight_column_max([down.weight]), 0.5)
    after = before / s
    w_before = down.weight.abs().amax(0)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    axes[0].plot(before.numpy(), lw=0.6, label="activations, max |x_j|")
    axes[0].plot(after.numpy(), lw=0.6, label="after smoothing, max |x_j / s_j|")
    axes[0].set_yscale("log")
    axes[0].legend(loc="upper right")
    axes[0].set_title(f"SmolLM2-135M layer {layer_index} down_proj input, 16 × 512 pydoc-calib tokens (α = 0.5)")
    axes[1].plot(w_before.numpy(), lw=0.6, label="weights, max |W_j|")
    axes[1].plot((w_before * s).numpy(), lw=0.6, label="after smoothing, max |W_j s_j|")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("input channel")
    axes[1].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    ratio = lambda m: float(m.max() / m.median())  # noqa: E731
    return {"layer": layer_index, "activation_max_over_median": ratio(before),
            "smoothed_max_over_median": ratio(after), "weight_max_over_median": ratio(w_before),
            "smoothed_weight_max_over_median": ratio(w_before * s)}


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(rows: list[dict], plot: dict | None, note: str) -> str:
    from lowbit.cli import versions

    v = next((r["versions"] for r in rows if "versions" in r), None) or versions()
    fp = rows[0]["reference_ppl"]["pydoc-eval"]
    llmc = next((r["version"] for r in rows if "version" in r), None)
    lines = ["# Outliers: AWQ and SmoothQuant (SmolLM2-135M-Instruct, pydoc-eval)", "",
             f"Measured on {v['machine']} (each row's date in its last column), torch {v['torch']} ({v['torch_threads']} threads), lowbit "
             f"{v['lowbit']}; calibration 128 × 512 tokens of pydoc-calib (random.Random(0) offsets) for every "
             f"calibrated row unless its label says fewer, llm-compressor's included. FP perplexity {fp:.4f}. "
             "Runs one after the other; the 1-minute load average before each is in the load column (the machine is shared)."
             + (f" llm-compressor {llmc}, in its own virtual environment." if llmc else ""), "",
             "| setting | bits/weight | ppl | Δppl | KL | top-1 % | quantise s | load | measured (UTC) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ppl = r["ppl"]["pydoc-eval"]
        bpw = r.get("bits_per_weight") or float("nan")
        seconds = r.get("quantize_seconds", r.get("seconds", float("nan")))
        lines.append(f"| {r['label']} | {bpw:.3f} | {ppl:.4f} | {100 * (ppl / fp - 1):+.2f}% | {r['kl']:.5f} | "
                     f"{r['top1']:.2f} | {seconds:.1f} | {_load(r.get('load_before'))} | "
                     f"{r.get('versions', {}).get('date', 'n/a')} |")
    if plot:
        lines += ["", f"outliers_activations.png: layer {plot['layer']}'s down_proj input; the largest channel's max "
                      f"|x| is {plot['activation_max_over_median']:.0f}× the median channel's before smoothing, "
                      f"{plot['smoothed_max_over_median']:.1f}× after (weights: "
                      f"{plot['weight_max_over_median']:.1f}× → {plot['smoothed_weight_max_over_median']:.1f}×)."]
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def save(rows: list[dict], plot: dict | None, partial: bool, note: str) -> str:
    """Write outliers.json and .md; a partial run (--only) replaces its own rows and keeps the others."""
    rows = list(rows)
    previous = json.loads((RESULTS / "outliers.json").read_text()) if (RESULTS / "outliers.json").exists() else {}
    if partial and previous:  # a partial rerun replaces its own rows and keeps the others
        done = {r["label"] for r in rows}
        rows = [r for r in previous["rows"] if r["label"] not in done] + rows
        order = [label for label, _ in SETTINGS]
        rows.sort(key=lambda r: (order.index(r["label"]) if r["label"] in order else len(order), r["label"]))
        plot = plot or previous.get("plot")
    stamp = {"plot": plot, "rows": rows, "loadavg_end": os.getloadavg()}
    (RESULTS / "outliers.json").write_text(json.dumps(stamp, indent=2, default=str) + "\n")
    table = markdown(rows, plot, note)
    (RESULTS / "outliers.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated labels' first words (W4A16, W3A16, W8A8, FP8, "
                                                   "W4A16_ASYM, llmc, plot); default all")
    parser.add_argument("--labels", default="", help="semicolon-separated exact row labels to run, e.g. "
                                                     "'W3A16 g128, AWQ;FP8, naive (RTN)' (with --only, either matches)")
    parser.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    parser.add_argument("--awq-samples", type=int, default=128,
                        help="calibration sequences for the AWQ comparison with llm-compressor, whose AWQ runs its "
                             "grid search over every cached token and takes hours on 2 cores at 128")
    parser.add_argument("--llmc-which", default="awq,sq", help="which llm-compressor comparisons to run, in this order "
                                                            "(awq, sq)")
    parser.add_argument("--in-process", action="store_true", help="run lowbit's rows in this process (see InProcess)")
    parser.add_argument("--note", default="")
    parser.add_argument("--tabulate", action="store_true", help="only rewrite outliers.md from outliers.json (with --note)")
    args = parser.parse_args()
    if args.tabulate:
        stamp = json.loads((RESULTS / "outliers.json").read_text())
        print(save(stamp["rows"], stamp.get("plot"), True, args.note))
        return
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    exact = {w.strip() for w in args.labels.split(";") if w.strip()}
    unknown = exact - {label for label, _ in SETTINGS}
    if unknown:
        parser.error(f"--labels: no row is called {sorted(unknown)}; rows: {[label for label, _ in SETTINGS]}")
    pick = lambda label: (not wanted and not exact) or label in exact or label.split()[0].rstrip(",") in wanted  # noqa: E731
    RESULTS.mkdir(exist_ok=True)
    rows: list[dict] = []
    plot = activation_plot(RESULTS / "outliers_activations.png") if pick("plot") else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runner = InProcess() if args.in_process and any(pick(label) for label, _ in SETTINGS) else None
        for label, a in SETTINGS:
            if pick(label):
                load = os.getloadavg()[0]
                row = runner.row(label, a) if runner else run_setting(label, [*a, *CALIB], work)
                rows.append({**row, "load_before": load})
                save(rows, plot, bool(wanted or exact), args.note)  # after every row: a long run interrupted keeps what it did
        if pick("llmc"):  # llm-compressor, and lowbit at the same setting and calibration size, one after the other
            pairs = {"awq": (args.awq_samples, "AWQ, W4A16_ASYM g64", ["--scheme", "W4A16_ASYM", "--group-size", "64",
                                                                     "--method", "awq"]),
                     "sq": (128, "SmoothQuant W8A8", ["--scheme", "W8A8", "--method", "smoothquant"])}
            for which in (w.strip() for w in args.llmc_which.split(",") if w.strip()):
                if which not in pairs:
                    parser.error(f"--llmc-which: unknown comparison '{which}'; choose from awq, sq")
                samples, label, scheme = pairs[which]
                start = time.perf_counter()
                load = os.getloadavg()[0]
                rows.append({**llmc_row(args.llmc_python, which, work, samples), "load_before": load,
                             "label": f"llm-compressor {label}, {samples}×512 calib",
                             "wall_seconds": time.perf_counter() - start})
                save(rows, plot, bool(wanted or exact), args.note)
                if samples != 128:
                    load = os.getloadavg()[0]
                    rows.append({**run_setting(f"lowbit {label}, {samples}×512 calib",
                                               [*scheme, "--calib-samples", str(samples), "--calib-seqlen", "512"],
                                               work), "load_before": load})
                    save(rows, plot, bool(wanted or exact), args.note)
    print(save(rows, plot, bool(wanted or exact), args.note))


if __name__ == "__main__":
    main()
