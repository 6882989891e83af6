"""``lowbit compare``: several schemes × methods on one model, measured alike, in one report.

For one float model the comparison computes, once: the reference statistics of each text
(`lowbit.eval.reference_stats`: the float model's log-probabilities, re-used for the KL
and top-1 of every row), the calibration set, and each linear layer's input second moment
``XᵀX`` on a few calibration sequences (for the per-layer error). Then, per scheme × method
(combinations a method cannot quantise are listed as skipped, with the reason):

- quantise (wall time), footprint (bits per weight with scales, zero points and g_idx);
- perplexity per text, KL and top-1 against the cached float statistics (PROTOCOL.md);
- accuracy on the downstream tasks (`lowbit.eval.tasks`, scored natively);
- greedy decoding speed (a 64-token prompt, 128 new tokens, batch 1);
- peak resident memory of the process while the row ran (the kernel's high-water mark is
  reset before each row; the float model and cached statistics are resident throughout);
- relative output error per decoder layer, ``Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ)`` over its
  linears with ``H ∝ XᵀX`` of the *float* model's inputs — one yardstick for every method.

Rows are written to ``compare.json`` as they finish; a rerun with ``resume=True`` keeps
the finished rows of the same settings. `lowbit.compare_report` writes report.md/.html and
the plots from that file.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms import method_from_name
from lowbit.algorithms.gptq import output_error
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.eval.metrics import EvalConfig, ReferenceStats, evaluate_tokens, reference_stats
from lowbit.eval.scoring import evaluate_task
from lowbit.eval.tasks import resolve_task
from lowbit.footprint import model_footprint
from lowbit.io import atomic_file
from lowbit.memory import peak_rss_bytes, reset_peak_rss
from lowbit.models import decoder_layers, select_linears
from lowbit.nn import quantized_modules
from lowbit.report import versions

log = logging.getLogger(__name__)


FLOAT_LABEL = "FP (float32 compute, bf16 storage)"


@dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs and how it measures; written into compare.json."""

    schemes: tuple[str, ...] = ("W4A16", "W3A16")
    methods: tuple[str, ...] = ("rtn", "gptq")
    texts: tuple[str, ...] = ("pydoc-eval",)
    tasks: tuple[str, ...] = ("lastword", "nextsent")
    task_items: int | None = 100
    task_text: str = "pydoc-eval"
    calib: str = "pydoc-calib"
    calib_samples: int = 32
    calib_seqlen: int = 512
    error_samples: int = 8  # calibration sequences for the per-layer error's XᵀX
    window: int = 2048
    max_windows: int = 16
    kl_windows: int = 4
    decode_prompt: int = 64
    decode_new: int = 128

    def eval_config(self) -> EvalConfig:
        return EvalConfig(self.window, self.max_windows, self.kl_windows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Row:
    """One model of the comparison (the float reference is a row too, with method 'float')."""

    label: str
    scheme: str
    method: str
    skipped: str | None = None
    bits_per_weight: float | None = None
    weight_bytes: int | None = None
    quantized_params: int = 0
    quantize_seconds: float | None = None
    texts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per text: ppl, kl, top1, tokens, blocks
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: metrics and per-item outcomes
    decode_tokens_per_s: float | None = None
    peak_rss_bytes: int | None = None
    layer_errors: list[float] | None = None
    layer_errors_note: str = ""
    load_average: float | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: Tensor, new: int) -> float:
    """Greedy tokens/s of ``generate`` (prefill included) after a short warm-up, batch 1."""
    kwargs = dict(do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up: kernel choice, first touch
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs)
    return new / (time.perf_counter() - start)


@torch.inference_mode()
def input_moments(model: nn.Module, names: list[str], calib: Tensor) -> dict[str, HessianAccumulator]:
    """XᵀX of each named linear's inputs over the calibration sequences (n, seqlen), one forward each."""
    acc: dict[str, HessianAccumulator] = {}
    hooks = []
    for name in names:
        linear = model.get_submodule(name)
        acc[name] = HessianAccumulator.zeros(linear.in_features)
        hooks.append(linear.register_forward_pre_hook(lambda _m, args, name=name: acc[name].add(args[0].float())))
    try:
        device = next(model.parameters()).device
        for sequence in calib:
            model(input_ids=sequence[None].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return acc


def layer_errors(quantized: nn.Module, float_weights: dict[str, Tensor], xtx: dict[str, Tensor]) -> list[float]:
    """Relative output error per decoder layer: Σ tr(ΔW XᵀX ΔWᵀ) / Σ tr(W XᵀX Wᵀ) over its quantised linears."""
    prefix, layers = decoder_layers(quantized)
    errors, signals = [0.0] * len(layers), [0.0] * len(layers)
    for name, module in quantized_modules(quantized).items():
        if name not in xtx or not name.startswith(prefix + "."):
            continue
        index = int(name[len(prefix) + 1:].split(".")[0])
        W = float_weights[name]
        errors[index] += output_error(W, module.weight.dequantize(), xtx[name])
        signals[index] += output_error(W, None, xtx[name])
    return [e / s if s else 0.0 for e, s in zip(errors, signals)]


def compare(model: nn.Module, tokenizer: Any, config: CompareConfig, out: str | Path, model_name: str = "default",
            resume: bool = False, progress: bool = True, float_row: bool = True) -> dict[str, Any]:
    """Run the comparison into directory ``out`` (compare.json, then the report); returns the data.

    ``float_row=False`` leaves out the float model's own row (its statistics are still computed, for KL):
    for a comparison split across processes and joined with `merge`.
    """
    from lowbit.api import check_method, quantize
    from lowbit.calibration import calibration_set, load_text, tokenize
    from lowbit.scheme import get_scheme

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.json"
    schemes = {name: get_scheme(name) for name in config.schemes}  # unknown names fail here, before any work
    methods = {name: method_from_name(name) for name in config.methods}
    tasks = [resolve_task(spec, config.task_text, config.task_items) for spec in config.tasks]
    streams = {text: tokenize(tokenizer, load_text(text)) for text in config.texts}
    previous: dict[str, Any] = {}
    if resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("config") == json.loads(json.dumps(config.to_dict())) and old.get("model") == model_name:
            previous = {row["label"]: row for row in old["rows"]}
    data: dict[str, Any] = {"model": model_name, "config": config.to_dict(), "versions": versions(),
                            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}

    eval_config = config.eval_config()
    references: dict[str, ReferenceStats] = {}
    for text, tokens in streams.items():
        log.info("float model on %s: reference statistics (cached for every row)", text)
        references[text] = reference_stats(model, tokens, eval_config, desc=f"float {text}", progress=progress)
    needs_calibration = any(getattr(m, "needs_calibration", False) for m in methods.values())
    calib = calibration_set(config.calib, n=max(config.calib_samples, config.error_samples), seqlen=config.calib_seqlen,
                            tokenizer=tokenizer)
    first_scheme = next(iter(schemes.values()))
    names = list(select_linears(model, first_scheme.targets, first_scheme.ignore))
    log.info("inputs of %d linears on %d calibration sequences (per-layer error)", len(names), config.error_samples)
    xtx = {n: acc.full() for n, acc in input_moments(model, names, calib[: config.error_samples]).items()}
    float_weights = {name: model.get_submodule(name).weight.detach().float() for name in names}
    prompt = streams[config.texts[0]][: config.decode_prompt][None]

    def measure(label: str, scheme: str, method: str, target: nn.Module, row: Row) -> Row:
        fp = model_footprint(target)
        row.bits_per_weight, row.weight_bytes, row.quantized_params = fp.bits_per_weight, fp.total_bytes, \
            fp.quantized_params
        for text, tokens in streams.items():
            if method == "float":
                ref = references[text]
                row.texts[text] = {"ppl": ref.ppl, "tokens": ref.count, "windows": int(ref.windows.shape[0]),
                                   "blocks": asdict(ref.blocks)}
            else:
                result = evaluate_tokens(target, tokens, references[text], eval_config, desc=f"{label} {text}",
                                         progress=progress)
                row.texts[text] = {**result.to_dict(), "blocks": asdict(result.blocks)}
        for task in tasks:
            log.info("%s: task %s (%d items)", label, task.name, len(task.items))
            scored = evaluate_task(target, tokenizer, task, progress=progress)
            row.tasks[task.name] = {**scored.to_dict(), "correct": scored.correct, "correct_norm": scored.correct_norm}
        log.info("%s: decode speed", label)
        row.decode_tokens_per_s = decode_speed(target, prompt, config.decode_new)
        return row

    rows_to_run = [(FLOAT_LABEL, "float", "float")] if float_row else []
    rows_to_run += [(f"{s} {m.upper()}", s, m) for s in config.schemes for m in config.methods]
    for label, scheme_name, method_name in rows_to_run:
        if label in previous:
            data["rows"].append(previous[label])
            log.info("%s: kept from the previous run", label)
            continue
        start = time.perf_counter()
        reset = reset_peak_rss()
        row = Row(label, scheme_name, method_name, load_average=os.getloadavg()[0])
        if method_name == "float":
            row = measure(label, scheme_name, method_name, model, row)
            row.bits_per_weight = 16.0
        else:
            scheme, method = schemes[scheme_name], methods[method_name]
            try:
                check_method(scheme, method, has_calibration=True)
            except LowbitError as err:
                row.skipped = str(err)
            if row.skipped is None:
                log.info("%s: quantising", label)
                quantized = quantize(model, scheme, method, calib=calib[: config.calib_samples]
                                     if needs_calibration else None, progress=progress)
                row.quantize_seconds = quantized.lowbit_info.seconds
                row = measure(label, scheme_name, method_name, quantized, row)
                if method_name in ("rtn", "gptq"):
                    row.layer_errors = layer_errors(quantized, float_weights, xtx)
                else:
                    row.layer_errors_note = "scales folded into the float weights: not comparable to the float W"
                del quantized
                gc.collect()
        row.peak_rss_bytes = peak_rss_bytes() if reset else None
        row.seconds = time.perf_counter() - start
        data["rows"].append(row.to_dict())
        data["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        log.info("%s done in %.0f s", label, row.seconds)
    return data


def merge(parts: list[dict[str, Any]], allow_missing: bool = False) -> dict[str, Any]:
    """One comparison from runs split across processes (each a compare.json's data): the same model and
    settings but for their schemes and methods; rows in schemes × methods order, the float row first.
    A row no run finished is refused, or with ``allow_missing`` listed as not measured."""
    if not parts:
        raise LowbitError("nothing to merge: no compare.json given.")
    first = parts[0]
    settings = {k: v for k, v in first["config"].items() if k not in ("schemes", "methods")}
    for part in parts[1:]:
        other = {k: v for k, v in part["config"].items() if k not in ("schemes", "methods")}
        if part["model"] != first["model"] or other != settings:
            raise LowbitError("the runs to merge differ in model or settings (other than --schemes / --methods).")
    schemes = list(dict.fromkeys(s for p in parts for s in p["config"]["schemes"]))
    methods = list(dict.fromkeys(m for p in parts for m in p["config"]["methods"]))
    rows = {row["label"]: row for part in parts for row in part["rows"]}
    order = [FLOAT_LABEL] + [f"{s} {m.upper()}" for s in schemes for m in methods]
    missing = [label for label in order if label not in rows]
    if missing and not allow_missing:
        raise LowbitError(f"the runs to merge have no row {missing[0]!r}.")
    for label in missing:
        scheme, _, method = ("float", "", "float") if label == FLOAT_LABEL else label.partition(" ")
        rows[label] = Row(label, scheme, method.lower(), skipped="not measured: its run was stopped before this "
                          "row finished").to_dict()
    return {**first, "config": {**first["config"], "schemes": schemes, "methods": methods},
            "started": min(p["started"] for p in parts), "finished": max(p.get("finished", "") for p in parts),
            "rows": [rows[label] for label in order], "merged_from": len(parts)}
