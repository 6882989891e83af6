"""lowbit's GPTQ beside llm-compressor's, on the same model, calibration tokens and metric.

llm-compressor runs in its own virtual environment (it pins its own transformers); this
script drives both sides and evaluates both results with lowbit's PROTOCOL.md evaluator:

    python -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0 llmcompressor
    python bench/vs_llmcompressor.py --llmc-python /work/llmc-venv/bin/python

Steps: (1) write the protocol's calibration set (128 × 512 tokens of pydoc-calib,
random.Random(0) offsets) and the float model's safetensors directory; (2) in the other
environment, run llm-compressor's `oneshot` with a GPTQModifier (W4A16, int4 symmetric,
group 64 — it refuses group 128 on 576-wide layers — its defaults otherwise: static
act-order, damping 0.01, block 128), timing it and reading its peak RSS, and save the
dequantised weights it produced; (3) load those weights into the float model here and
evaluate; (4) run `lowbit quantize --method gptq` with the same scheme as a user would, and
RTN beside it; (5) write bench/results/vs_llmcompressor.{json,md}.
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

RESULTS = Path(__file__).parent / "results"

LLMC_SIDE = r'''
import json, sys, time
import torch
from safetensors.torch import load_file, save_file
from datasets import Dataset
from transformers import AutoModelForCausalLM
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
import llmcompressor

model_dir, calib_file, out_file, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokens = load_file(calib_file)["input_ids"]
data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
start = time.perf_counter()
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=tokens.shape[0],
        max_seq_length=tokens.shape[1], shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
# load + oneshot, before saving; VmHWM, not ru_maxrss, which keeps the parent's peak across exec
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
weights = {n + ".weight": m.weight.detach().float().contiguous() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
# The weights must already lie on the 4-bit grid (at most 16 values per group of a row).
probe = weights["model.layers.0.mlp.down_proj.weight"][:8, :group]
assert all(row.unique().numel() <= 16 for row in probe), "llm-compressor left unquantised weights"
save_file(weights, out_file)
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak,
                  "version": llmcompressor.__version__, "torch": torch.__version__}))
'''


TEXTS = ("pydoc-eval", "python-license", "stdlib-code")  # the calibration domain, then two others


def evaluate_weights(weights_file: Path) -> dict:
    """Float model with the given linear weights swapped in, evaluated against the float model."""
    import torch
    from safetensors.torch import load_file

    import lowbit
    from lowbit.calibration import load_text, tokenize
    from lowbit.eval import evaluate_tokens

    reference = lowbit.load_model()
    tok = lowbit.load_tokenizer()
    model = lowbit.load_model()
    for name, tensor in load_file(str(weights_file)).items():
        model.get_submodule(name[: -len(".weight")]).weight.data = tensor
    out: dict = {"ppl": {}, "reference_ppl": {}, "kl": {}, "top1": {}}
    for text in TEXTS:
        with torch.inference_mode():
            r = evaluate_tokens(model, tokenize(tok, load_text(text)), reference)
        for key in out:
            out[key][text] = getattr(r, key)
    return out


def lowbit_run(args: list[str], workdir: Path) -> dict:
    report = workdir / f"lowbit-{len(list(workdir.iterdir()))}.json"
    start = time.perf_counter()
    texts = [arg for text in TEXTS for arg in ("--eval-text", text)]
    subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "default", *args, *texts, "--json", str(report)],
                   check=True)
    data = json.loads(report.read_text())
    return {"ppl": data["ppl"], "reference_ppl": data["reference_ppl"], "kl": data["kl_per_text"],
            "top1": data["top1_per_text"], "seconds": data["quantize_seconds"],
            "peak_rss_bytes": data["peak_rss_quantize_bytes"], "peak_rss_with_eval_bytes": data["peak_rss_bytes"],
            "wall_seconds": time.perf_counter() - start, "bits_per_weight": data["bits_per_weight"],
            "calibration_dtype": data["details"].get("calibration_dtype"), "versions": data["versions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmc-python", required=True, help="python of the environment with llmcompressor")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    import lowbit
    from lowbit.models.loading import _ensure_gguf_cache, resolve_source
    from safetensors.torch import save_file

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = _ensure_gguf_cache(resolve_source(None))
        calib = lowbit.calibration_set("pydoc-calib", n=128, seqlen=512, tokenizer=lowbit.load_tokenizer())
        save_file({"input_ids": calib}, str(work / "calib.safetensors"))
        script = work / "llmc_side.py"
        script.write_text(LLMC_SIDE)
        loads = {"before llm-compressor": os.getloadavg()[0]}  # the machine is shared: say how busy it was
        out = subprocess.run([args.llmc_python, str(script), str(model_dir), str(work / "calib.safetensors"),
                              str(work / "llmc.safetensors"), "64"], check=True, capture_output=True, text=True)
        llmc = json.loads(out.stdout.strip().splitlines()[-1])
        llmc.update(evaluate_weights(work / "llmc.safetensors"))
        rows["llm-compressor GPTQ W4A16 g64 (static act-order)"] = llmc
        loads["before lowbit"] = os.getloadavg()[0]
        rows["lowbit GPTQ W4A16 g64 (static act-order)"] = lowbit_run(
            ["--scheme", "W4A16", "--group-size", "64", "--method", "gptq", "--act-order", "--static-groups"], work)
        rows["lowbit RTN W4A16 g64"] = lowbit_run(["--scheme", "W4A16", "--group-size", "64"], work)
        loads["at the end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vs_llmcompressor.json").write_text(json.dumps(rows, indent=2) + "\n")
    v = rows["lowbit GPTQ W4A16 g64 (static act-order)"]["versions"]
    fp = rows["lowbit RTN W4A16 g64"]["reference_ppl"]
    lines = [f"# GPTQ: lowbit beside llm-compressor {llmc['version']} (SmolLM2-135M-Instruct)", "",
             f"Measured {v['date']} on {v['machine']}, torch {v['torch']}, one after the other (1-minute load "
             "average " + ", ".join(f"{v:.2f} {k}" for k, v in loads.items()) + "); calibration 128 × 512 tokens of pydoc-calib for both; every model evaluated by lowbit's "
             "PROTOCOL.md evaluator on the calibration domain (pydoc-eval) and on two others: python-license "
             "(CPython's LICENSE.txt, legal prose, one 2048-token window) and stdlib-code (Python source).", "",
             "FP ppl: " + ", ".join(f"{t} {fp[t]:.4f}" for t in TEXTS) + ".", "",
             "Quantise s: llm-compressor's `oneshot`, lowbit's `quantize` call (both include running the "
             "calibration data). Peak RSS: the process that loads the model and quantises it, read right "
             "after quantising (before saving or evaluating).", "",
             "| run | " + " | ".join(f"ppl {t} | KL {t}" for t in TEXTS) + " | top-1 % pydoc-eval | quantise s "
             "| peak RSS GB |", "|---|" + "---:|---:|" * len(TEXTS) + "---:|---:|---:|"]
    for label, r in rows.items():
        cells = " | ".join(f"{r['ppl'][t]:.4f} | {r['kl'][t]:.5f}" for t in TEXTS)
        lines.append(f"| {label} | {cells} | {r['top1']['pydoc-eval']:.2f} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} |")
    g, c = rows["lowbit GPTQ W4A16 g64 (static act-order)"], llmc
    lines += ["", f"lowbit's GPTQ time is {g['seconds'] / c['seconds']:.2f} of llm-compressor's, its peak RSS "
              f"{g['peak_rss_bytes'] / c['peak_rss_bytes']:.2f} of it (lowbit calibration matmuls in "
              f"{g['calibration_dtype']})."]
    text = "\n".join(lines) + ("\n\n" + args.note if args.note else "") + "\n"
    (RESULTS / "vs_llmcompressor.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
