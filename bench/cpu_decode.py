"""Greedy decoding speed of the default model on this CPU: FP32 against quantised weights.

PROTOCOL.md: torch with 2 threads, batch 1, a 64-token prompt (the start of pydoc-eval),
128 new tokens, greedy; tokens/s = new tokens / wall time of ``generate`` (prefill
included), best of ``--repeats`` runs after one warm-up. The runs are interleaved: every model is built
first, then each round times every model once, so a slow spell of this shared machine costs every row
a run rather than one row all of its runs. Each quantised model is RTN of
the same float model; its text is compared with the same quantised weights run through
the reference kernel (dequantise + F.linear, and torch's F.linear for the layers left in float),
which must give the same greedy tokens. A quantised model's float layers (the tied lm_head) run
on lowbit's float GEMV (`lowbit.nn.FloatLinear`), as `lowbit.quantize` leaves them; so the FP32
model is timed twice: as torch runs it (the × FP32 column) and with every linear on that GEMV
(the × FP32-on-lowbit's-GEMV column: the gain that is quantisation's alone).
The presets in ``--int8-head`` are timed again with their output projection quantised too
(``--lm-head int8``: per-channel int8, untied from the float embedding). Besides the presets,
the planner's mixed-precision scheme of a bench/results/planner.json row
(``--planned``, by default its 3.5 bits-per-weight plan with the planner's defaults: int3 and
int4 in groups of 32 to 128) is quantised with RTN and timed the same way. So is W4A16 by GPTQ
with act-order and no static groups (``--act-order-samples`` calibration sequences): its weights
carry a g_idx, as GPTQ checkpoints written with desc_act do.

    python bench/cpu_decode.py [--repeats 3] [--schemes W4A16,...] [--int8-head W4A16,...] [--planned LABEL]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from _cpu_results import RESULTS, Stamp, write

import lowbit
from lowbit.algorithms.gptq import GPTQ
from lowbit.calibration import calibration_set, load_text, tokenize
from lowbit.kernels import dispatch
from lowbit.nn import use_float_gemv
from lowbit.scheme import Scheme, get_scheme, with_lm_head

PLANNED = "rtn plan 3.5 bpw, defaults"
SCHEMES = ("W8A16", "W4A16", "W4A16_ASYM", "W8A8", "W3A16", "NF4", "W2A16", "Q4_0")


def generate(model, prompt: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """One greedy run: its wall time in seconds and the new tokens."""
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        return time.perf_counter() - start, out[0, prompt.shape[1]:]


def interleaved(models: dict[str, torch.nn.Module], prompt: torch.Tensor, new: int,
                repeats: int) -> dict[str, tuple[float, torch.Tensor, bool]]:
    """Each model's tokens/s (best of ``repeats`` after a warm-up), its text, and whether every run gave that text;
    round r times every model once."""
    texts, best = {}, {}
    for name, model in models.items():  # warm-up (and the first-use kernel builds); timed only without repeats
        seconds, texts[name] = generate(model, prompt, new)
        best[name] = float("inf") if repeats else seconds
    steady = dict.fromkeys(models, True)
    for round_ in range(repeats):
        for name, model in models.items():
            seconds, tokens = generate(model, prompt, new)
            steady[name] = steady[name] and bool(torch.equal(tokens, texts[name]))
            best[name] = min(best[name], seconds)
        print(f"round {round_ + 1} of {repeats}: " + ", ".join(f"{n.split(' (')[0]} {new / best[n]:.2f}"
                                                                for n in models), flush=True)
    return {name: (new / best[name], texts[name], steady[name]) for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="cpu_decode", help="bench/results/<name>.{json,md}.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="Comma-separated presets to time.")
    parser.add_argument("--int8-head", default="W4A16,W8A16",
                        help="Comma-separated presets to time again with lm_head int8 ('' for none).")
    parser.add_argument("--planned", default=PLANNED,
                        help="Label of the bench/results/planner.json row whose mixed scheme to time too ('' for none).")
    parser.add_argument("--act-order-samples", type=int, default=16,
                        help="Calibration sequences (512 tokens of pydoc-calib) for the GPTQ act-order row, whose "
                             "weights carry a g_idx as desc_act checkpoints do (0: no such row).")
    args = parser.parse_args()
    torch.set_num_threads(2)
    stamp = Stamp()  # the machine is shared: say how busy it was
    tok = lowbit.load_tokenizer()
    prompt = tokenize(tok, load_text("pydoc-eval"))[:64][None]
    fp = lowbit.load_model()
    fast_fp = copy.deepcopy(fp)
    use_float_gemv(fast_fp)
    models = {"FP32": fp, "FP32, every linear on lowbit's float GEMV": fast_fp}
    settings: list[tuple[str, str | Scheme, dict]] = [(name, name, {}) for name in args.schemes.split(",") if name]
    settings += [(f"{name} + lm_head int8", with_lm_head(get_scheme(name), "int8"), {})
                 for name in args.int8_head.split(",") if name]
    if args.planned:
        rows_by_label = {r["label"]: r for r in json.loads((RESULTS / "planner.json").read_text())}
        if args.planned not in rows_by_label:
            raise SystemExit(f"bench/results/planner.json has no row labelled {args.planned!r}.")
        settings.append((f"{args.planned} (planner.json)", Scheme.from_dict(rows_by_label[args.planned]["scheme"]), {}))
    if args.act_order_samples:
        calib = calibration_set(n=args.act_order_samples, seqlen=512, tokenizer=tok)
        settings.append((f"W4A16 GPTQ act-order, g_idx ({args.act_order_samples} × 512 calibration tokens)", "W4A16",
                         {"method": GPTQ(act_order=True, static_groups=False), "calib": calib}))
    cpu = torch.device("cpu")
    kernels, references = {}, {}
    for name, scheme, method in settings:
        q = models[name] = lowbit.quantize(fp, scheme, progress=False, **method)
        layers = [m for m in q.modules() if isinstance(m, lowbit.nn.QuantLinear)]
        # (decode, prefill): every kernel the layers take at one token and at the prompt's (a mixed scheme may
        # take several)
        kernels[name] = tuple(", ".join(sorted({dispatch.choose(x.kernel_weight, x.activations, cpu, m).name
                                                for x in layers})) for m in (1, prompt.shape[1]))
        with dispatch.reference_only():  # the same weights through the reference kernel only: one run
            references[name] = generate(q, prompt, args.new_tokens)
        print(f"{name}: quantised; the reference kernel's run took {references[name][0]:.1f} s", flush=True)
    timed = interleaved(models, prompt, args.new_tokens, args.repeats)
    (fp_speed, fp_tokens, fp_steady), (fast_speed, fast_tokens, fast_steady) = (
        timed["FP32"], timed["FP32, every linear on lowbit's float GEMV"])
    if unsteady := [name for name, (*_, steady) in timed.items() if not steady]:
        print(f"warning: greedy text differed between runs of {', '.join(unsteady)}", flush=True)
    fast_same = bool(torch.equal(fast_tokens, fp_tokens))  # a float model's reference is plain torch: FP32's text
    rows = [{"setting": "FP32", "tokens_per_s": fp_speed, "speedup": 1.0, "speedup_vs_fast_fp32": fp_speed / fast_speed,
             "kernel": "F.linear", "prefill_kernel": "F.linear", "same_text_as_reference": True,
             "same_text_as_fp32": True, "same_text_every_run": fp_steady},
            {"setting": "FP32, every linear on lowbit's float GEMV", "tokens_per_s": fast_speed,
             "speedup": fast_speed / fp_speed, "speedup_vs_fast_fp32": 1.0, "kernel": "lowbit float GEMV",
             "prefill_kernel": "F.linear", "same_text_as_reference": fast_same, "same_text_as_fp32": fast_same,
             "same_text_every_run": fast_steady}]
    print(f"FP32: {fp_speed:.2f} tokens/s; on lowbit's float GEMV {fast_speed:.2f} tokens/s", flush=True)
    for name, *_ in settings:
        speed, tokens, steady = timed[name]
        ref_seconds, ref_tokens = references[name]
        kernel, prefill_kernel = kernels[name]
        rows.append({"setting": name, "tokens_per_s": speed, "speedup": speed / fp_speed,
                     "speedup_vs_fast_fp32": speed / fast_speed, "kernel": kernel,
                     "reference_kernel_tokens_per_s": args.new_tokens / ref_seconds,
                     "prefill_kernel": prefill_kernel,
                     "same_text_as_reference": bool(torch.equal(tokens, ref_tokens)),
                     "same_text_as_fp32": bool(torch.equal(tokens, fp_tokens)), "same_text_every_run": steady})
        print(f"{name}: {speed:.2f} tokens/s ({speed / fp_speed:.2f}× FP32, kernel {kernel}), "
              f"text equal to reference kernel's: {rows[-1]['same_text_as_reference']}", flush=True)
    env = stamp.finish()
    lines = [f"# Greedy decoding on CPU (SmolLM2-135M-Instruct, prompt 64, {args.new_tokens} new tokens, batch 1)",
             "", f"Measured {env['date']} on {env['machine']} ({env['load']}); best of {args.repeats} after a warm-up, "
             "the runs interleaved (each round times every row once); "
             "RTN weights unless the row says otherwise; lm_head and embeddings stay float32 (tied) unless the row "
             "says lm_head int8 (then the head is int8 per channel and the embedding float32). A quantised model's "
             "float32 head runs on lowbit's float GEMV, as `lowbit.quantize` leaves it; × FP32 is against the "
             "float model as torch runs it, × fast FP32 against the float model with every linear on lowbit's "
             "float GEMV (the second row). The reference kernel's run is plain torch throughout.", "",
             f"| weights | kernel at M=1 | at M={prompt.shape[1]} (prompt) | tokens/s | × FP32 | × fast FP32 | "
             "reference kernel tokens/s (one run) | greedy text = reference kernel's | = FP32's |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ref = r.get("reference_kernel_tokens_per_s")
        lines.append(f"| {r['setting']} | {r['kernel']} | {r['prefill_kernel']} | {r['tokens_per_s']:.2f} | "
                     f"{r['speedup']:.2f} | {r['speedup_vs_fast_fp32']:.2f} | "
                     f"{'–' if ref is None else f'{ref:.2f}'} | "
                     f"{r['same_text_as_reference']} | {r['same_text_as_fp32']} |")
    write(args.name, env, rows, lines)


if __name__ == "__main__":
    main()
