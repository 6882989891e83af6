"""Layer-by-layer quantisation with calibration data (the shell around GPTQ's pure core).

For each decoder layer, true-sequentially by default: one forward pass over the whole
calibration set, in which a pre-hook on each selected linear builds its input Hessian
from what actually reaches it (already through the quantised q/k/v when o runs, and so
on), quantises it with `gptq_quantize`, and lets the pass continue with the quantised
weight; the pass's output feeds the next layer. Without true-sequential, the Hessians
come from the float layer and a second pass makes the outputs. A linear the calibration
data never reaches (an unused expert, say) falls back to round-to-nearest and is named
in the report; so is every dead input channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import GPTQ, gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.calibration.pipeline import LayerInputs, capture_first_layer_inputs, collect, run_layer
from lowbit.models import select_linears, set_submodule
from lowbit.nn import QuantLinear
from lowbit.scheme import Scheme
from lowbit.tensor import QuantizedWeight

log = logging.getLogger(__name__)


@dataclass
class LayerwiseReport:
    """Per decoder layer, the relative output error of the quantised layer on calibration data."""

    layer_errors: list[float] = field(default_factory=list)
    module_errors: dict[str, float] = field(default_factory=dict)  # ‖(W − Q)Xᵀ‖² / n
    module_signal: dict[str, float] = field(default_factory=dict)  # ‖WXᵀ‖² / n
    fallbacks: list[str] = field(default_factory=list)  # modules never reached: quantised with RTN
    dead_columns: dict[str, int] = field(default_factory=dict)
    calibration_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        relative = {k: v / self.module_signal[k] if self.module_signal.get(k) else 0.0
                    for k, v in self.module_errors.items()}
        return {"layer_errors": self.layer_errors, "module_relative_errors": relative,
                "fallbacks": self.fallbacks, "dead_columns": self.dead_columns,
                "calibration_tokens": self.calibration_tokens}


def _gptq(linear: nn.Linear, acc: HessianAccumulator, spec, method: GPTQ, full: str, report: LayerwiseReport):
    result = gptq_quantize(linear.weight, acc.hessian(), spec, method.block_size, method.damp, method.act_order,
                           method.static_groups, name=f"{full}.weight")
    report.module_errors[full] = result.error
    report.module_signal[full] = result.signal
    if result.dead_columns:
        report.dead_columns[full] = result.dead_columns
    return result.weight


def _quantize_in_one_pass(layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear], prefix: str,
                          spec, method: GPTQ, report: LayerwiseReport) -> tuple[dict[str, QuantizedWeight], list[Tensor]]:
    """True-sequential GPTQ in a single forward pass over all calibration samples at once.

    A pre-hook on each linear takes the input it is about to receive — which already
    flows through every quantised predecessor — builds its Hessian, runs GPTQ, and lets
    the forward continue with the quantised weight. The layer's output is then the
    quantised layer's output, ready for the next layer.
    """
    weights: dict[str, QuantizedWeight] = {}
    # q/k/v and gate/up read the same tensor: one Hessian each. The tensor is kept in the
    # cache so its memory cannot be reused by another input with the same address.
    shared: dict[tuple[int, tuple[int, ...]], tuple[Tensor, HessianAccumulator]] = {}
    handles = []
    for local, linear in linears.items():
        def pre_hook(module: nn.Linear, args: tuple, local: str = local) -> None:
            if local in weights:
                return
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            if key not in shared:
                acc = HessianAccumulator.zeros(module.in_features)
                acc.add(x)
                shared[key] = (x, acc)
            weights[local] = _gptq(module, shared[key][1], spec, method, prefix + local, report)
            module.weight.data = weights[local].dequantize(module.weight.dtype)

        handles.append(linear.register_forward_pre_hook(pre_hook))
    try:
        outputs = run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return weights, outputs


def _quantize_after_float_pass(layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear], prefix: str,
                               spec, method: GPTQ, report: LayerwiseReport
                               ) -> tuple[dict[str, QuantizedWeight], list[Tensor]]:
    """All Hessians from the float layer (batch by batch), then GPTQ, then a quantised pass."""
    stats, _ = collect(layer, inputs, linears, lambda m: HessianAccumulator.zeros(m.in_features))
    weights = {}
    for local, linear in linears.items():
        acc = stats[local]
        assert isinstance(acc, HessianAccumulator)
        if acc.count:
            weights[local] = _gptq(linear, acc, spec, method, prefix + local, report)
            linear.weight.data = weights[local].dequantize(linear.weight.dtype)
    return weights, run_layer(layer, inputs)


def quantize_layerwise(model: nn.Module, scheme: Scheme, method: GPTQ, calib: Tensor, batch_size: int | None = None,
                       progress: bool = True) -> LayerwiseReport:
    """Quantise ``model`` in place, one decoder layer at a time, with GPTQ on ``calib`` (N, T).

    With ``method.true_sequential`` (the default) every layer costs one forward pass over
    the calibration set, processed as one batch; otherwise the Hessians come from the
    float layer in batches of ``batch_size`` and a second pass makes the outputs.
    """
    spec = scheme.weights
    selected = select_linears(model, scheme.targets, scheme.ignore)
    one_batch = calib.shape[0] if method.true_sequential or batch_size is None else batch_size
    name, layers, inputs = capture_first_layer_inputs(model, calib, one_batch)
    report = LayerwiseReport(calibration_tokens=inputs.tokens)
    bar = tqdm(range(len(layers)), desc=f"gptq {scheme.name}", unit="layer", disable=None if progress else True)
    for i in bar:
        layer = layers[i]
        prefix = f"{name}.{i}."
        linears = {n[len(prefix):]: m for n, m in selected.items() if n.startswith(prefix)}
        step = _quantize_in_one_pass if method.true_sequential else _quantize_after_float_pass
        weights, outputs = step(layer, inputs, linears, prefix, spec, method, report)
        for local, weight in weights.items():
            set_submodule(layer, local, QuantLinear(weight, linears[local].bias, scheme.activations))
        signal = sum(report.module_signal[prefix + n] for n in weights) or 1.0
        error = sum(report.module_errors[prefix + n] for n in weights) / signal
        report.layer_errors.append(error)
        bar.set_postfix(layer=i, rel_err=f"{error:.2e}")
        log.info("layer %d: relative output error of its linears %.3e", i, error)
        inputs = LayerInputs(outputs, inputs.kwargs)
    unreached = [(n, m) for n, m in model.named_modules() if n in selected and isinstance(m, nn.Linear)]
    for full, linear in unreached:  # selected but never reached by calibration data
        log.warning("%s never saw calibration data; quantised with round-to-nearest", full)
        report.fallbacks.append(full)
        weight = rtn_quantize(linear.weight, spec, name=f"{full}.weight")
        set_submodule(model, full, QuantLinear(weight, linear.bias, scheme.activations))
    return report
