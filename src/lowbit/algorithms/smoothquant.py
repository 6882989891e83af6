"""SmoothQuant: move the activations' outliers into the weights before W8A8 quantisation.

Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023, arXiv 2211.10438.

Activations of LLMs have a few input channels whose magnitude is far above the rest, in
every token; per-token int8 scales then waste most codes on them. With a per-channel s,
Y = (X·diag(s)⁻¹)(diag(s)·Wᵀ) is the same product; SmoothQuant (§4, eq. 4) takes

    s_j = max|X_j|^α / max|W_j|^(1−α)

so that the smoothed activation and weight columns share the range: α = 0.5 splits it
evenly (the paper's default for most models), larger α moves more into the weights. The
division by s is folded into the operation that produces X (`lowbit.models.mappings`);
the scaled weights are then quantised per channel, the activations per token (dynamic)
or per tensor with a scale fixed from the calibration set (static, the paper's O1–O3).

``search`` picks α per group of linears on a grid, as the paper suggests for models where
0.5 is not best (§5.4, "migration strength"): the α whose W8A8 output on a sample of
calibration tokens is closest to the float output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowbit.algorithms.awq import check_propagate
from lowbit.algorithms.gptq import CALIB_DTYPES, GPTQ
from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec
from lowbit.tensor import fake_quantize, quantize_weight


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant settings: migration strength ``alpha`` in [0, 1]; with ``search``, α per group of
    linears from ``grid`` (the default 0.5 is always among the candidates). With ``gptq`` set, the
    smoothed weights are rounded by GPTQ instead of round-to-nearest ("smoothquant+gptq"). ``propagate``:
    the next layer calibrates on the float layer's outputs ("float", one pass per layer, as the paper's
    code) or on the quantised layer's ("quantized", a second pass); see `lowbit.algorithms.awq.AWQ`."""

    alpha: float = 0.5
    search: bool = False
    grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    sample_tokens: int = 512
    gptq: GPTQ | None = None
    propagate: str = "float"
    calib_dtype: str = "auto"
    name: str = "smoothquant"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(float(a) for a in self.grid))
        for a in (self.alpha, *self.grid):
            if not 0.0 <= a <= 1.0:
                raise LowbitError(f"SmoothQuant alpha must lie in [0, 1], got {a!r}.")
        if self.search and not self.grid:
            raise LowbitError("SmoothQuant's alpha search needs a non-empty grid.")
        if self.calib_dtype not in CALIB_DTYPES:
            raise LowbitError(f"calibration dtype must be one of {', '.join(CALIB_DTYPES)}, got {self.calib_dtype!r}.")
        check_propagate(self.propagate)

    @property
    def label(self) -> str:
        return "smoothquant+gptq" if self.gptq else "smoothquant"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["name"] = self.label
        return out


def weight_column_max(weights: Sequence[Tensor]) -> Tensor:
    """max |W_j| over the rows of every weight that reads the input, (C,)."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothquant_scale(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α); 1 where a channel's activations or weights are all zero."""
    a, w = act_max.float(), weight_max.float()
    s = a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def w8a8_output_error(X: Tensor, weights: Sequence[Tensor], s: Tensor, wspec: QuantSpec, aspec: QuantSpec) -> float:
    """Σ ‖q(X·diag(s)⁻¹) Q(W·diag(s))ᵀ − X Wᵀ‖² over the weights, for a sample X (n, C)."""
    X = X.float()
    Xq = fake_quantize(X / s, aspec)
    err = 0.0
    for W in weights:
        Q = quantize_weight(W.float() * s, wspec).dequantize()
        err += float((Xq @ Q.T - X @ W.float().T).pow(2).sum())
    return err


def smoothquant_search(X: Tensor, weights: Sequence[Tensor], act_max: Tensor, wspec: QuantSpec, aspec: QuantSpec,
                       grid: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The α of ``grid`` with the least W8A8 output error on the sample X (n, C), and every α's error."""
    wmax = weight_column_max(weights)
    errors = {a: w8a8_output_error(X, weights, smoothquant_scale(act_max, wmax, a), wspec, aspec) for a in grid}
    return min(errors, key=errors.__getitem__), errors


__all__ = ["SmoothQuant", "smoothquant_scale", "smoothquant_search", "w8a8_output_error", "weight_column_max"]
