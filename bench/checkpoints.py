"""Checkpoints other tools read and write, on the default model (SmolLM2-135M), measured today.

1. lowbit → others: the default model quantised by lowbit (RTN W4A16 sym g64) is exported as
   compressed-tensors and as GPTQ v1; transformers loads the compressed-tensors export
   (its own compressed-tensors quantizer, CPU), lowbit reads both back; every model's
   perplexity is computed by the same function on the same windows of pydoc-eval.
2. others → lowbit: llm-compressor (in its own environment, ``--llmc-python``) quantises the
   default model (QuantizationModifier, W4A16 sym g64, no calibration) and saves it
   compressed; its perplexity is computed there on its own fake-quantised model, and
   here on lowbit's import of the checkpoint.

    python bench/checkpoints.py --llmc-python /work/llmc-venv/bin/python

Writes bench/results/checkpoints.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WINDOW, WINDOWS = 512, 8

# One perplexity function, run verbatim in both environments: exp(mean NLL of every token after the first of
# each window), the windows non-overlapping, in float32.
PPL = r'''
def perplexity(model, windows):
    import math, torch
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return math.exp(total / count)
'''

LLMC_SIDE = PPL + r'''
import json, sys, time, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
import llmcompressor, compressed_tensors

model_dir, windows_file, out_dir = sys.argv[1:4]
windows = load_file(windows_file)["windows"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))
start = time.perf_counter()
oneshot(model=model, recipe=QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]))
seconds = time.perf_counter() - start
ppl = perplexity(model, windows)
model.save_pretrained(out_dir, save_compressed=True)
print(json.dumps({"ppl": ppl, "seconds": seconds, "llmcompressor": llmcompressor.__version__,
                  "compressed_tensors": compressed_tensors.__version__}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmc-python", default=None, help="python of an environment with llmcompressor")
    args = parser.parse_args()
    import platform

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.calibration import load_text, tokenize
    from lowbit.io import load_compressed_tensors, load_gptq, save_compressed_tensors, save_gptq
    from lowbit.models.loading import _ensure_gguf_cache, resolve_source
    from lowbit.scheme import QuantSpec, Scheme

    scope: dict = {}
    exec(PPL, scope)  # noqa: S102 - the same text runs in the peer's environment
    perplexity = scope["perplexity"]
    torch.set_num_threads(2)
    tokens = tokenize(lowbit.load_tokenizer(), load_text("pydoc-eval"))
    windows = tokens[: WINDOW * WINDOWS].reshape(-1, WINDOW)
    rows: list[dict] = []

    def row(name: str, ppl: float, **extra) -> None:
        rows.append({"model": name, "ppl": ppl, **extra})
        print(f"{name}: ppl {ppl:.4f}", flush=True)

    fp = lowbit.load_model()
    row("float32 (reference)", perplexity(fp, windows))
    scheme = Scheme(QuantSpec("int", 4, "group", 64), name="W4A16 g64")
    q = lowbit.quantize(fp, scheme, progress=False)
    ours = perplexity(q, windows)
    row("lowbit RTN W4A16 g64 (in memory)", ours)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        save_compressed_tensors(q, work / "ct")
        row("→ compressed-tensors → lowbit", perplexity(load_compressed_tensors(work / "ct"), windows),
            export_seconds=time.perf_counter() - start)
        hf = AutoModelForCausalLM.from_pretrained(work / "ct", dtype=torch.float32)
        row("→ compressed-tensors → transformers", perplexity(hf, windows))
        del hf
        save_gptq(q, work / "gptq")
        row("→ GPTQ v1 → lowbit", perplexity(load_gptq(work / "gptq"), windows))
        if args.llmc_python:
            save_file({"windows": windows.contiguous()}, str(work / "windows.safetensors"))
            script = work / "llmc_side.py"
            script.write_text(LLMC_SIDE)
            model_dir = _ensure_gguf_cache(resolve_source(None))
            done = subprocess.run([args.llmc_python, str(script), str(model_dir), str(work / "windows.safetensors"),
                                   str(work / "llmc")], capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"the llm-compressor side failed:\n{done.stderr[-3000:]}")
            peer = json.loads(done.stdout.strip().splitlines()[-1])
            row(f"llm-compressor {peer['llmcompressor']} RTN W4A16 g64 (in its own environment)", peer["ppl"],
                seconds=peer["seconds"], compressed_tensors=peer["compressed_tensors"])
            row("llm-compressor's checkpoint → lowbit", perplexity(load_compressed_tensors(work / "llmc"), windows))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, torch {torch.__version__}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoints.json").write_text(json.dumps({"date": when, "machine": machine, "window": WINDOW,
                                                          "windows": WINDOWS, "rows": rows}, indent=2) + "\n")
    lines = [f"# Checkpoints across tools (SmolLM2-135M, pydoc-eval, {WINDOWS} × {WINDOW} tokens)", "",
             f"Measured {when} on {machine}. Every perplexity by the same function (bench/checkpoints.py, PPL) on "
             "the same windows; a row equal to the one it was exported from means the checkpoint carried the model "
             "unchanged.", "", "| model | ppl |", "|---|---:|"]
    lines += [f"| {r['model']} | {r['ppl']:.4f} |" for r in rows]
    (RESULTS / "checkpoints.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
