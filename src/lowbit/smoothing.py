"""Per-channel scales folded into a decoder layer before it is quantised (the shell around AWQ and SmoothQuant).

`lowbit.sequential` runs each float decoder layer once over the calibration chunks with a
`ChannelStats` on every group of linears that read one tensor; `smooth_layer` then, group
by group, finds the producer of that tensor (`lowbit.models.mappings`), computes s with
the method's pure core (`awq_search`, `smoothquant_scale` / `smoothquant_search`), folds
it, and checks on a 16-token probe in float32 that the layer's output is what it was. A
group is left unscaled, with its reason in the report, when its inputs are all zero on
the calibration set, when no producer can take the scale, when the producer's or a
consumer's weight is shared with other modules, or when the probe shows that the fold
changed the layer's function (it is then undone). The model's float function is never
changed by smoothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms.awq import AWQ, awq_gptq_search, awq_search
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.smoothquant import SmoothQuant, smoothquant_scale, smoothquant_search, weight_column_max
from lowbit.calibration.pipeline import LayerInputs, run_layer
from lowbit.formats import FP8_MAX, int_range
from lowbit.models.mappings import Producer, find_producer, fold_scale, input_producers
from lowbit.scheme import QuantSpec

log = logging.getLogger(__name__)

SAMPLE_STRIDE = 16  # SmoothQuant's α search keeps every 16th calibration token (up to sample_tokens)
PROBE_RTOL = 1e-4  # a fold may change the probe's output by float32 rounding, no more


@dataclass
class ChannelStats:
    """Running statistics of the inputs X (n, C) of one group of linears."""

    abs_sum: Tensor  # (C,) Σ|x| per channel, float32
    abs_max: Tensor  # (C,) max|x| per channel
    hessian: HessianAccumulator | None = None  # XᵀX, for AWQ's output error
    sample_limit: int = 0  # rows of X kept for SmoothQuant's α search
    sample: list[Tensor] = field(default_factory=list)
    count: int = 0

    @classmethod
    def zeros(cls, features: int, hessian: bool, sample_limit: int, device: torch.device) -> ChannelStats:
        acc = HessianAccumulator.zeros(features, device=device) if hessian else None
        return cls(torch.zeros(features, device=device), torch.zeros(features, device=device), acc, sample_limit)

    def add(self, x: Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])  # (n, C)
        magnitude = flat.abs().float()
        self.abs_sum += magnitude.sum(dim=0)
        torch.maximum(self.abs_max, magnitude.amax(dim=0), out=self.abs_max)
        self.count += flat.shape[0]
        if self.hessian is not None:
            self.hessian.add(flat)
        kept = sum(s.shape[0] for s in self.sample)
        if kept < self.sample_limit:
            self.sample.append(flat[::SAMPLE_STRIDE][: self.sample_limit - kept].float().clone())

    @property
    def mean(self) -> Tensor:
        return self.abs_sum / max(self.count, 1)


def make_stats(method: AWQ | SmoothQuant, module: nn.Linear) -> ChannelStats:
    """The statistics ``method`` needs of ``module``'s inputs."""
    sample = method.sample_tokens if isinstance(method, SmoothQuant) and method.search else 0
    return ChannelStats.zeros(module.in_features, isinstance(method, AWQ), sample, module.weight.device)


@dataclass
class Smoothed:
    """What smoothing one layer left for its quantisation step, by linear (local names)."""

    scales: dict[str, Tensor] = field(default_factory=dict)  # s of the linear's group (absent: 1)
    hessians: dict[str, Tensor] = field(default_factory=dict)  # H of the linear's *scaled* inputs (AWQ)
    input_max: dict[str, float] = field(default_factory=dict)  # max|x/s| over the calibration set
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # per group: producer, α, …
    skipped: dict[str, str] = field(default_factory=dict)  # per group: why it was left unscaled


def _float32(inputs: LayerInputs) -> LayerInputs:
    def cast(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.float() if v.is_floating_point() else v
        if isinstance(v, (tuple, list)):
            return type(v)(cast(x) for x in v)
        return v
    return LayerInputs([cast(h) for h in inputs.hidden], [{k: cast(v) for k, v in kw.items()} for kw in inputs.kwargs])


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, n in seen.items() if n > 1}


def _close(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.isfinite(y).all() and (x - y).abs().max() <= PROBE_RTOL * x.abs().max() + 1e-6
               for x, y in zip(a, b))


def _scale(method: AWQ | SmoothQuant, stats: ChannelStats, H: Tensor | None, weights: list[Tensor],
           scheme_weights: QuantSpec, activations: QuantSpec | None) -> tuple[Tensor, dict[str, Any]]:
    """The group's s with the method's core, and what to report about it."""
    if isinstance(method, AWQ):
        assert H is not None
        s, alpha, errors = awq_search(weights, H, stats.mean, scheme_weights, method.grid)
        if method.gptq is not None:
            s, alpha, errors = awq_gptq_search(weights, H, stats.mean, scheme_weights, method.gptq,
                                               [alpha, alpha / 2])
        return s, {"alpha": alpha, "error": errors[alpha], "unscaled_error": errors[0.0]}
    alpha = method.alpha
    record: dict[str, Any] = {}
    if method.search and activations is not None:
        sample = torch.cat(stats.sample)
        alpha, errors = smoothquant_search(sample, weights, stats.abs_max, scheme_weights, activations,
                                           sorted({*method.grid, method.alpha}))
        record["errors"] = errors
    return smoothquant_scale(stats.abs_max, weight_column_max(weights), alpha), {"alpha": alpha, **record}


def activation_level_max(spec: QuantSpec) -> float:
    """The largest code value of an activation format (127 for int8, 448 for e4m3)."""
    return FP8_MAX[spec.format[4:]] if spec.format.startswith("fp8_") else float(int_range(spec.bits, True)[1])


def smooth_layer(model: nn.Module, layer: nn.Module, stats: dict[str, ChannelStats], probe: LayerInputs,
                 linears: dict[str, nn.Linear], groups: list[list[str]], prefix: str, method: AWQ | SmoothQuant,
                 weights_spec: QuantSpec, activations: QuantSpec | None) -> Smoothed:
    """Search, fold and verify a scale for each group (``stats`` keyed by the group's first linear)."""
    out = Smoothed()
    probe = _float32(probe)
    shared = _shared_parameters(model)
    with torch.inference_mode():
        reference = run_layer(layer, probe)
        made_by = input_producers(layer, lambda: run_layer(layer, probe), linears)
    for group in groups:
        label = prefix + "+".join(group)
        stat = stats.get(group[0])
        H = stat.hessian.hessian() if stat is not None and stat.hessian is not None else None
        for local in group:
            if stat is not None:
                out.input_max[local] = float(stat.abs_max.max())
            if H is not None:
                out.hessians[local] = H
        reason, producer = None, Producer(None, None)
        if stat is None or stat.count == 0:
            reason = "the calibration data never reached it"
        elif not bool((stat.abs_max > 0).any()):
            reason = "its inputs are all zero on the calibration set"
        else:
            producer = find_producer(layer, group, made_by)
            reason = producer.reason
        if reason is None:
            params = [producer.module.weight, *(linears[n].weight for n in group)]  # type: ignore[union-attr]
            if any(id(p) in shared for p in params):
                reason = f"{producer.name}'s or a consumer's weight is shared with other modules"
        if reason is not None:
            out.skipped[label] = reason
            log.info("%s: not scaled (%s)", label, reason)
            continue
        assert producer.module is not None and stat is not None
        consumers = [linears[n] for n in group]
        s, record = _scale(method, stat, H, [c.weight.data for c in consumers], weights_spec, activations)
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            out.skipped[label] = "the scale search gave a non-finite or non-positive scale"
            continue
        saved = [(t, t.data) for m in (producer.module, *consumers)
                 for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(t, Tensor)]
        fold_scale(producer.module, consumers, s)
        with torch.inference_mode():
            after = run_layer(layer, probe)
        if not _close(reference, after):
            for tensor, data in saved:
                tensor.data = data
            out.skipped[label] = (f"folding the scale into {producer.name} changed the layer's float output on a "
                                  "probe (its output reaches more than these linears, or not linearly)")
            log.info("%s: not scaled (%s)", label, out.skipped[label])
            continue
        H_scaled = None if H is None else H / s[:, None] / s[None, :]  # H of x/s: diag(s)⁻¹ H diag(s)⁻¹
        for local in group:
            out.scales[local] = s
            out.input_max[local] = float((stat.abs_max / s).max())
            if H_scaled is not None:
                out.hessians[local] = H_scaled
        out.records[label] = {"producer": prefix + str(producer.name), **record,
                              "scale_min": float(s.min()), "scale_max": float(s.max())}
    return out


__all__ = ["ChannelStats", "Smoothed", "activation_level_max", "make_stats", "smooth_layer"]
