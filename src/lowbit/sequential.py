"""Layer-by-layer quantisation with calibration data (the shell around GPTQ's pure core).

For each decoder layer, true-sequentially by default: one forward pass over the whole
calibration set, in which a pre-hook on each selected linear builds its input Hessian
from what actually reaches it (already through the quantised q/k/v when o runs, and so
on), quantises it with GPTQ, and lets the pass continue with the quantised weight; the
pass's output feeds the next layer. Linears that read the same tensor (q/k/v, gate/up:
found by running the layer on a 16-token probe, not by name) share one Hessian and one
solve. Without true-sequential, the Hessians come from the float layer and a second
pass makes the outputs. The pass runs in bfloat16 where the hardware multiplies it
natively (`GPTQ.calib_dtype`), activations included (`_precision`); Hessians and the
weights GPTQ solves for are float32. A linear the calibration data never reaches
(an unused expert, say) falls back to round-to-nearest and is named in the report; so
is every dead input channel.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit import distributed
from lowbit.algorithms.awq import AWQ, awq_clip_ranges, output_error, quantize_in_range
from lowbit.algorithms.gptq import GPTQ, GPTQResult, gptq_factor, gptq_solve_group
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.smoothquant import SmoothQuant
from lowbit.calibration.pipeline import (LayerInputs, capture_first_layer_inputs, collect, run_layer,
                                        run_layer_staged)
from lowbit.errors import LowbitError
from lowbit.memory import drop_file_pages, release_pages, trim_heap
from lowbit.models import select_linears, set_submodule
from lowbit.models.layers import name_filter
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec, Scheme
from lowbit.smoothing import Smoothed, activation_level_max, make_stats, smooth_layer
from lowbit.tensor import QuantizedWeight

log = logging.getLogger(__name__)

CHUNK_TOKENS = 4096  # calibration tokens per chunk: memory ∝ chunk, matmuls still large


@dataclass
class LayerwiseReport:
    """Per decoder layer, the relative output error of the quantised layer on calibration data."""

    layer_errors: list[float] = field(default_factory=list)
    module_errors: dict[str, float] = field(default_factory=dict)  # ‖(W − Q)Xᵀ‖² / n
    module_signal: dict[str, float] = field(default_factory=dict)  # ‖WXᵀ‖² / n
    fallbacks: list[str] = field(default_factory=list)  # modules never reached: quantised with RTN
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)  # AWQ / SmoothQuant: per group folded
    skipped_scales: dict[str, str] = field(default_factory=dict)  # per group left unscaled: why
    dead_columns: dict[str, int] = field(default_factory=dict)
    calibration_tokens: int = 0
    calibration_dtype: str = "float32"
    solve_seconds: float = 0.0  # in GPTQ's solves (and their all-reduces); the rest is the calibration passes

    def to_dict(self) -> dict[str, Any]:
        relative = {k: v / self.module_signal[k] if self.module_signal.get(k) else 0.0
                    for k, v in self.module_errors.items()}
        return {"layer_errors": self.layer_errors, "module_relative_errors": relative,
                "fallbacks": self.fallbacks, "scales": self.scales, "skipped_scales": self.skipped_scales,
                "dead_columns": self.dead_columns,
                "calibration_tokens": self.calibration_tokens, "calibration_dtype": self.calibration_dtype,
                "solve_seconds": self.solve_seconds}


def calibration_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the calibration forward's matmuls; see `GPTQ.calib_dtype`."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _stream_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the hidden states between layers are kept in under `_precision`; None: as the model makes them."""
    return torch.bfloat16 if dtype == torch.bfloat16 else None


@contextlib.contextmanager
def _precision(layer: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run ``layer``'s calibration forward in ``dtype`` (see `GPTQ.calib_dtype`).

    bfloat16 has float32's range, so the whole layer computes in it: its floating
    parameters and buffers are swapped for bfloat16 copies while the context lasts, and
    every activation — the residual stream, the tensors each paused chunk holds — takes
    half the memory. GPTQ's reference code calibrates the same way (with the model in
    float16). float16's range is too narrow for some residual streams, so it only
    autocasts the matmuls. On exit a parameter gets its original back unless it was
    replaced meanwhile (a quantised weight keeps its replacement).
    """
    first = next(layer.parameters(), None)
    if first is None or dtype == torch.float32 or first.dtype == dtype:
        yield
        return
    if _stream_dtype(dtype) is None:
        with torch.autocast(first.device.type, dtype=dtype):
            yield
        return
    swapped = []
    for tensor in itertools.chain(layer.parameters(), layer.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            original = tensor.data
            tensor.data = original.to(dtype)
            swapped.append((tensor, original, tensor.data_ptr()))
    try:
        yield
    finally:
        for tensor, original, ptr in swapped:
            if tensor.data_ptr() == ptr:
                tensor.data = original


def shared_input_groups(layer: nn.Module, probe: LayerInputs, linears: dict[str, nn.Linear]) -> list[list[str]]:
    """Linears that receive the very same input tensor (q/k/v, gate/up), from a run on a tiny probe.

    They share one Hessian and one GPTQ solve. Groups come in the order the layer calls
    its linears; a linear the probe does not reach is left out (it gets its own group if
    the calibration pass reaches it).
    """
    by_input: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    alive: list[Tensor] = []  # held, so a freed input's address cannot be reused by the next one
    handles = []
    for local, linear in linears.items():
        def record(_module: nn.Module, args: tuple, local: str = local) -> None:
            x = args[0]
            alive.append(x)
            by_input.setdefault((x.data_ptr(), tuple(x.shape)), []).append(local)

        handles.append(linear.register_forward_pre_hook(record))
    try:
        run_layer(layer, probe)
    finally:
        for handle in handles:
            handle.remove()
    return list(by_input.values())


def _solve(group: list[str], linears: dict[str, nn.Linear], float_weights: dict[str, Tensor], acc: HessianAccumulator,
           spec_of: Callable[[str], QuantSpec], method: GPTQ, prefix: str, report: LayerwiseReport
           ) -> dict[str, QuantizedWeight]:
    """GPTQ on the group's weights (as loaded, whatever the pass computes in) with their shared Hessian.

    Each linear's weight is then set to its dequantised value, in the dtype the pass uses,
    and the loaded weight is let go.
    """
    # the Hessian in the accumulator's memory, factorised once for the group (q/k/v, gate/up)
    factor = gptq_factor(acc.take_hessian(), method.damp, method.act_order, f"{prefix}{group[0]}.weight")
    by_spec: dict[QuantSpec, list[str]] = {}  # a mixed scheme (lowbit.planner) may give q, k and v different bits
    for local in group:
        by_spec.setdefault(spec_of(prefix + local), []).append(local)
    solved: dict[str, GPTQResult] = {}
    for spec, part in by_spec.items():  # rows are independent given H: a part's solve is its own solve
        weights = [float_weights[n] for n in part]
        # under torchrun each rank solves a block of every weight's rows, then the blocks are gathered (one scale
        # per tensor needs every row)
        split = (distributed.active() and spec.granularity != "tensor"
                 and all(W.shape[0] >= distributed.world_size() for W in weights))
        mine = [W[distributed.row_block(W.shape[0])] for W in weights] if split else weights
        results = gptq_solve_group(factor, mine, spec, method.block_size, method.static_groups,
                                   [f"{prefix}{n}.weight" for n in part])
        solved.update(zip(part, [_gathered(r, W.shape) for r, W in zip(results, weights)] if split else results))
    del factor  # H and its inverse factor (1 GB at 11008 inputs) go before the dequantised weights are made
    for local in group:
        _install(prefix, local, solved[local], linears, float_weights, report)
    return {local: solved[local].weight for local in group}


def _gathered(block: GPTQResult, shape: tuple[int, ...]) -> GPTQResult:
    """The whole weight's result from every rank's row block (`distributed.row_block`): codes, scales and zero
    points concatenated by rows (row-wise packing, so the blocks join as they are), errors summed."""
    stored = block.weight.tensors()
    g_idx = stored.pop("g_idx", None)  # per column: the same on every rank
    rows = distributed.gather_rows(stored) | ({} if g_idx is None else {"g_idx": g_idx})
    loss, error, signal = distributed.sum_floats([block.loss, block.error, block.signal])
    weight = QuantizedWeight.from_tensors(rows, (shape[0], shape[1]), block.weight.spec)  # checked as a whole
    return GPTQResult(weight, loss, error, block.dead_columns, signal)


def _install(prefix: str, local: str, result: GPTQResult, linears: dict[str, nn.Linear],
             float_weights: dict[str, Tensor], report: LayerwiseReport) -> None:
    """A solved linear: its errors reported, its weight set to the dequantised value in the dtype the pass
    uses, and the loaded weight let go."""
    full = prefix + local
    report.module_errors[full] = result.error
    report.module_signal[full] = result.signal
    if result.dead_columns:
        report.dead_columns[full] = result.dead_columns
    linear = linears[local]
    linear.weight.data = result.weight.dequantize(linear.weight.dtype)
    release_pages(float_weights.pop(local))  # a memory-mapped float weight would otherwise stay resident


def _quantize_in_one_pass(layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear],
                          float_weights: dict[str, Tensor], groups: list[list[str]], prefix: str,
                          spec_of: Callable[[str], QuantSpec], method: GPTQ, report: LayerwiseReport
                          ) -> tuple[dict[str, QuantizedWeight], list[Tensor]]:
    """True-sequential GPTQ in a single forward pass over the calibration chunks.

    The chunks pause before each group of linears (`run_layer_staged`); their inputs —
    which already flow through every quantised predecessor — make the group's Hessian,
    GPTQ quantises the group, and the chunks go on with the quantised weights. The
    layer's output is then the quantised layer's output, ready for the next layer.
    """
    weights: dict[str, QuantizedWeight] = {}
    group_of = {local: group for group in groups for local in group}
    accs: dict[str, HessianAccumulator] = {}

    def observe(key: str, x: Tensor) -> None:
        if key not in accs:
            accs[key] = HessianAccumulator.zeros(x.shape[-1], device=x.device)
        accs[key].add(x)
        # The chunk pauses now, holding its live tensors; its freed temporaries go back to the
        # system, or the holes they leave between paused tensors add up. Default model, first 3
        # layers, 128 × 512 tokens, 2 cores: peak 1.11-1.13 GB in 6 runs with this, 1.12-1.29 GB in 5
        # without, for about 0.7 s more system time per layer (2.1 M page faults in 3 layers, not 0.7-1.1 M).
        trim_heap()

    def finish(key: str) -> None:
        group = group_of.get(key, [key])
        with torch.autocast(linears[key].weight.device.type, enabled=False):  # float32 solve
            start = time.perf_counter()
            weights.update(_solve(group, linears, float_weights, distributed.all_reduce(accs.pop(key)), spec_of,
                                  method, prefix, report))
            report.solve_seconds += time.perf_counter() - start
        trim_heap()  # the solve's temporaries, before the chunks go on

    outputs = run_layer_staged(layer, inputs, linears, stage=lambda local: group_of.get(local, [local])[0],
                               observe=observe, finish=finish)
    return weights, outputs


def _quantize_after_float_pass(layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear],
                               float_weights: dict[str, Tensor], groups: list[list[str]], prefix: str,
                               spec_of: Callable[[str], QuantSpec],
                               method: GPTQ, report: LayerwiseReport
                               ) -> tuple[dict[str, QuantizedWeight], list[Tensor]]:
    """All Hessians from the float layer (chunk by chunk), then GPTQ, then a quantised pass."""
    grouped = {local for group in groups for local in group}
    groups = groups + [[local] for local in linears if local not in grouped]
    firsts = {group[0]: linears[group[0]] for group in groups}
    stats, _ = collect(layer, inputs, firsts, lambda m: HessianAccumulator.zeros(m.in_features, device=m.weight.device))
    weights: dict[str, QuantizedWeight] = {}
    for group in groups:
        start = time.perf_counter()
        acc = distributed.all_reduce(stats[group[0]])  # type: ignore[arg-type]
        assert isinstance(acc, HessianAccumulator)
        if acc.count:
            weights.update(_solve(group, linears, float_weights, acc, spec_of, method, prefix, report))
        report.solve_seconds += time.perf_counter() - start
    return weights, run_layer(layer, inputs)


def _round_to_nearest(linears: dict[str, nn.Linear], smoothed: Smoothed, prefix: str, spec, method: AWQ | SmoothQuant,
                      report: LayerwiseReport) -> dict[str, QuantizedWeight]:
    """Round each (scaled) weight to nearest; under AWQ with clipping, in the ranges its clipping search picks."""
    skip_clip = name_filter(method.no_clip, ()) if isinstance(method, AWQ) else None
    weights = {}
    for local, linear in linears.items():
        full, W = prefix + local, linear.weight.data.float()
        H = smoothed.hessians.get(local)
        if isinstance(method, AWQ) and method.clip and H is not None and not skip_clip(full):  # type: ignore[misc]
            lo, hi = awq_clip_ranges(W, H, spec, method.clip_grid, method.clip_max_shrink)
            weights[local] = quantize_in_range(W, spec, lo, hi, name=f"{full}.weight")
        else:
            weights[local] = rtn_quantize(W, spec, name=f"{full}.weight")
        if H is not None:
            report.module_errors[full] = output_error(weights[local].dequantize() - W, H)
            report.module_signal[full] = output_error(W, H)
        linear.weight.data = weights[local].dequantize(linear.weight.dtype)
    return weights


def _smooth(model: nn.Module, layer: nn.Module, inputs: LayerInputs, probe: LayerInputs,
            linears: dict[str, nn.Linear], groups: list[list[str]], prefix: str, scheme: Scheme,
            method: AWQ | SmoothQuant, dtype: torch.dtype, report: LayerwiseReport
            ) -> tuple[Smoothed, list[Tensor] | None]:
    """One pass of the float layer for its input statistics, then AWQ's or SmoothQuant's scales folded in.

    Also returns that pass's outputs (the float layer's: folding does not change them) when
    they are what the next layer calibrates on (``propagate="float"`` and no GPTQ), else None.
    """
    grouped = {local for group in groups for local in group}
    groups = groups + [[local] for local in linears if local not in grouped]
    with _precision(layer, dtype):
        stats, outputs = collect(layer, inputs, {g[0]: linears[g[0]] for g in groups},
                                 lambda m: make_stats(method, m))
    smoothed = smooth_layer(model, layer, stats, probe, linears, groups, prefix, method,  # type: ignore[arg-type]
                            scheme.weights, scheme.activations)
    report.scales.update(smoothed.records)
    report.skipped_scales.update(smoothed.skipped)
    return smoothed, (outputs if method.gptq is None and method.propagate == "float" else None)


def _input_scale(scheme: Scheme, smoothed: Smoothed | None, local: str) -> Tensor | None:
    """The static per-tensor activation scale of a linear: max|x/s| on the calibration set / the largest code."""
    act = scheme.activations
    if act is None or act.dynamic:
        return None
    if smoothed is None or local not in smoothed.input_max:
        raise LowbitError(f"{local} never saw calibration data, so it has no static activation scale; use a "
                          "scheme with dynamic activations or calibration text that reaches it.")
    return torch.tensor([max(smoothed.input_max[local], 1e-12) / activation_level_max(act)], dtype=torch.float32)


class LayerStream(Protocol):
    """Where `quantize_layerwise` gets its decoder layers from and puts them when done, for a model whose
    layers are not all in memory (`lowbit.streaming`): the model's layers start on the meta device."""

    start: int  # the first layer to quantise: earlier ones are done (a resumed run)

    def resume(self, inputs: LayerInputs, probe: LayerInputs) -> tuple[LayerInputs, LayerInputs]:
        """The inputs of layer ``start`` (hidden states saved by the run that did the earlier layers)."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Give layer ``index`` its float weights."""

    def done(self, index: int, layer: nn.Module, outputs: LayerInputs, probe: LayerInputs) -> None:
        """Layer ``index`` is quantised and ``outputs`` are the next layer's inputs: keep them, free the layer."""


def quantize_layerwise(model: nn.Module, scheme: Scheme, method: GPTQ | AWQ | SmoothQuant, calib: Tensor,
                       batch_size: int | None = None, progress: bool = True,
                       stream: LayerStream | None = None) -> LayerwiseReport:
    """Quantise ``model`` in place, one decoder layer at a time, with ``method`` on ``calib`` (N, T).

    The calibration set runs in chunks of ``batch_size`` sequences (default: about
    CHUNK_TOKENS tokens each). AWQ and SmoothQuant first run the float layer once for its
    input statistics and fold their scales into it (`lowbit.smoothing`); the layer is then
    rounded by GPTQ (``method`` itself, or the ``gptq`` of AWQ / SmoothQuant) or to nearest;
    rounded to nearest, the next layer calibrates on that float pass's outputs (``propagate``
    "float", one pass per layer as in both papers' code) or on a second, quantised pass's.
    With ``GPTQ.true_sequential`` (the default) GPTQ costs one forward pass over all chunks,
    paused before each group of linears while it quantises it; otherwise the Hessians come
    from the float layer and a second pass makes the outputs. With a ``stream`` the layers are
    loaded, handed back and freed one at a time (see `LayerStream`), from its ``start``.
    """
    spec = scheme.weights
    gptq = method if isinstance(method, GPTQ) else method.gptq
    smoother = None if isinstance(method, GPTQ) else method
    selected = select_linears(model, scheme.targets, scheme.ignore)
    names = set(selected)
    if batch_size is None:  # chunks of about CHUNK_TOKENS tokens
        batch_size = max(1, CHUNK_TOKENS // max(1, calib.shape[1]))
    device = torch.device("cpu") if stream is not None else next(model.parameters()).device
    dtype = calibration_dtype(method.calib_dtype, device)
    if distributed.active() and smoother is not None:
        raise LowbitError(f"{method.to_dict()['name']} does not run distributed yet (its activation statistics are not "
                          "all-reduced); run it in one process.")
    # under torchrun each rank calibrates on its share; the probe (which linears share an input) is everyone's
    name, layers, inputs = capture_first_layer_inputs(model, distributed.shard(calib), batch_size, _stream_dtype(dtype))
    _, _, probe = capture_first_layer_inputs(model, calib[:1, :16], 1, _stream_dtype(dtype))
    start = 0
    if stream is not None:
        start = stream.start
        inputs, probe = stream.resume(inputs, probe)
    for param in model.parameters():  # not read again until each layer's turn (or at all: embeddings, head)
        drop_file_pages(param)
    report = LayerwiseReport(calibration_tokens=distributed.total(inputs.tokens),
                             calibration_dtype=str(dtype).removeprefix("torch."))
    bar = tqdm(range(start, len(layers)), desc=f"{method.to_dict()['name']} {scheme.name}", unit="layer",
               disable=None if progress else True)
    for i in bar:
        layer = layers[i]
        prefix = f"{name}.{i}."
        if stream is not None:
            stream.load(i, layer)
        # popped: the float modules (and the float weights they hold) go as soon as the layer is done
        linears = {n[len(prefix):]: selected.pop(n) for n in list(selected) if n.startswith(prefix)}
        with _precision(layer, dtype):
            groups = shared_input_groups(layer, probe, linears)
        smoothed, float_outputs = None, None
        if smoother is not None:
            smoothed, float_outputs = _smooth(model, layer, inputs, probe, linears, groups, prefix, scheme, smoother,
                                              dtype, report)
        if gptq is None:  # from the float32 weights, before the pass swaps them for bfloat16 copies
            assert smoothed is not None and smoother is not None
            weights = _round_to_nearest(linears, smoothed, prefix, spec, smoother, report)
        float_weights = {local: linear.weight.data for local, linear in linears.items()}  # what GPTQ solves for
        with _precision(layer, dtype):
            if gptq is not None:
                step = _quantize_in_one_pass if gptq.true_sequential else _quantize_after_float_pass
                weights, outputs = step(layer, inputs, linears, float_weights, groups, prefix, scheme.spec_for, gptq,
                                        report)
            else:
                outputs = float_outputs if float_outputs is not None else run_layer(layer, inputs)
            probe = LayerInputs(run_layer(layer, probe), probe.kwargs)
        for local, weight in weights.items():
            set_submodule(layer, local, QuantLinear(weight, linears[local].bias, scheme.activations,
                                                    input_scale=_input_scale(scheme, smoothed, local)))
        signal = sum(report.module_signal.get(prefix + n, 0.0) for n in weights) or 1.0
        error = sum(report.module_errors.get(prefix + n, 0.0) for n in weights) / signal
        report.layer_errors.append(error)
        bar.set_postfix(layer=i, rel_err=f"{error:.2e}")
        log.info("layer %d: relative output error of its linears %.3e", i, error)
        inputs = LayerInputs(outputs, inputs.kwargs)
        _round_unreached(model, names, scheme, report, under=layer, prefix=prefix)
        if stream is not None:
            stream.done(i, layer, inputs, probe)
        trim_heap()
    selected.clear()
    done_before = tuple(f"{name}.{i}." for i in range(start))  # a resumed stream's earlier layers are not here
    names = {n for n in names if not n.startswith(done_before)}
    _round_unreached(model, names, scheme, report)
    return report


def _round_unreached(model: nn.Module, names: set[str], scheme: Scheme, report: LayerwiseReport,
                     under: nn.Module | None = None, prefix: str = "") -> None:
    """Round to nearest the selected linears (of the layer ``under``, named from ``prefix``, or of the whole
    model) that calibration data never reached."""
    root = model if under is None else under
    unreached = [(prefix + n, m) for n, m in root.named_modules() if prefix + n in names and isinstance(m, nn.Linear)]
    for full, linear in unreached:
        log.warning("%s never saw calibration data; quantised with round-to-nearest", full)
        report.fallbacks.append(full)
        weight = rtn_quantize(linear.weight, scheme.spec_for(full), name=f"{full}.weight")
        set_submodule(model, full, QuantLinear(weight, linear.bias, scheme.activations,
                                               input_scale=_input_scale(scheme, None, full)))
