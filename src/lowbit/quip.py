"""Below 4 bits: incoherence processing around any method, and QuIP#'s E8P codebook with LDLQ.

- `quantize_incoherent`: wrap the selected linears in randomised Hadamard transforms
  (`lowbit.nn.incoherent`: W̃ = U W Vᵀ, computed as y = Uᵀ Q(W̃) V x) and quantise the wrapped
  model with RTN or GPTQ as usual — the calibration hooks of the wrappers' inner linears see
  V x, so GPTQ solves against H̃ = V H Vᵀ (QuIP, Chee et al. 2023, arXiv 2307.13304).
- `quantize_e8p`: the same incoherence, then layer by layer (true-sequentially: each linear's
  Hessian from inputs that already flow through the quantised linears before it) block LDLQ to
  the E8P lattice codebook (`lowbit.algorithms.ldlq`; QuIP#, Tseng et al. 2024, arXiv 2402.04396).
  QuIP# also fine-tunes after rounding; that is not done here.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.ldlq import E8P, ldlq_e8p
from lowbit.api import QuantInfo, quantize
from lowbit.calibration.pipeline import LayerInputs, capture_first_layer_inputs, run_layer_staged
from lowbit.errors import LowbitError
from lowbit.models import set_submodule
from lowbit.nn.e8p_linear import E8PLinear
from lowbit.nn.incoherent import make_incoherent
from lowbit.scheme import QuantSpec, Scheme
from lowbit.sequential import CHUNK_TOKENS

log = logging.getLogger(__name__)


def quantize_incoherent(model: nn.Module, scheme: Scheme, method: Any = None, calib: Tensor | None = None,
                        seed: int = 0, progress: bool = True) -> nn.Module:
    """`lowbit.quantize` of ``model`` (left untouched) with incoherence processing: randomised Hadamard
    transforms (signs from ``seed``) on both sides of each selected linear. The checkpoint records
    the transforms (`lowbit.io.native`)."""
    target = copy.deepcopy(model)
    make_incoherent(target, scheme.targets, scheme.ignore, seed)
    inner = scheme.replace(targets=tuple(rf"(?:{t})\.inner" for t in scheme.targets),
                           ignore=tuple(rf"(?:{p})\.inner" for p in scheme.ignore))
    out = quantize(target, inner, method, calib, inplace=True, progress=progress)
    info = out.lowbit_info
    info.scheme = scheme
    info.details["incoherence"] = {"transform": "randomized-hadamard", "seed": seed}
    return out


def quantize_e8p(model: nn.Module, calib: Tensor, method: E8P = E8P(), targets: tuple[str, ...] = (r".*",),
                 ignore: tuple[str, ...] = (r"(.*\.)?lm_head",), batch_size: int | None = None,
                 progress: bool = True) -> nn.Module:
    """A copy of ``model`` with its selected linears as incoherent E8P layers (2 bits per weight)."""
    start = time.perf_counter()
    target = copy.deepcopy(model)
    wrapped = make_incoherent(target, targets, ignore, method.seed)
    if not wrapped:
        raise LowbitError(f"no linear layer of {type(model).__name__} matches the targets {targets}.")
    if batch_size is None:
        batch_size = max(1, CHUNK_TOKENS // max(1, calib.shape[1]))
    name, layers, inputs = capture_first_layer_inputs(target, calib, batch_size)
    details: dict[str, Any] = {"module_relative_errors": {}, "rms_targets": {}, "layer_errors": [],
                               "incoherence": {"transform": "randomized-hadamard", "seed": method.seed},
                               "calibration_tokens": inputs.tokens}
    bar = tqdm(range(len(layers)), desc="e8p", unit="layer", disable=None if progress else True)
    for i in bar:
        layer, prefix = layers[i], f"{name}.{i}."
        inners = {n[len(prefix):] + ".inner": m.inner for n, m in wrapped.items() if n.startswith(prefix)}
        accs: dict[str, HessianAccumulator] = {}
        solved: dict[str, E8PLinear] = {}
        errors, signals = 0.0, 0.0

        def observe(key: str, x: Tensor) -> None:
            accs.setdefault(key, HessianAccumulator.zeros(x.shape[-1], device=x.device)).add(x)

        def finish(key: str) -> None:
            nonlocal errors, signals
            linear = inners[key]
            result = ldlq_e8p(linear.weight.data, accs.pop(key).hessian(), method.damp, method.block_size,
                              method.candidates, name=f"{prefix}{key}.weight")
            linear.weight.data = result.weight.dequantize(linear.weight.dtype)  # the pass goes on quantised
            solved[key] = E8PLinear(result.weight)
            details["module_relative_errors"][prefix + key] = result.error / result.signal if result.signal else 0.0
            details["rms_targets"][prefix + key] = result.rms_target
            errors, signals = errors + result.error, signals + result.signal

        outputs = run_layer_staged(layer, inputs, inners, stage=lambda local: local, observe=observe, finish=finish)
        for key, module in solved.items():
            set_submodule(layer, key, module)
        unreached = sorted(set(inners) - set(solved))
        if unreached:
            raise LowbitError(f"calibration data never reached {prefix}{unreached[0]}; E8P needs its Hessian.")
        details["layer_errors"].append(errors / signals if signals else 0.0)
        bar.set_postfix(layer=i, rel_err=f"{details['layer_errors'][-1]:.2e}")
        inputs = LayerInputs(outputs, inputs.kwargs)
    # A Scheme needs a QuantSpec and E8P is none of its formats: the manifest's method (``e8p``) says what
    # the layers are; the 2-bit integer spec only stands for "2 bits per weight".
    scheme = Scheme(weights=QuantSpec("int", 2, "channel"), targets=targets, ignore=ignore, name="E8P")
    target.lowbit_info = QuantInfo(scheme, method.to_dict(), time.perf_counter() - start,
                                   getattr(model, "lowbit_source", "unknown"), details)
    return target


__all__ = ["E8P", "quantize_e8p", "quantize_incoherent"]
