"""AWQ: scale the input channels that carry large activations up before rounding the weights.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024, arXiv 2306.00978.

A linear y = X Wᵀ with its input columns multiplied by s and its input divided by s (the
division folded into the operation that produces X, see `lowbit.models.mappings`)
computes the same y; after quantisation Q it computes (X·diag(s)⁻¹) Q(W·diag(s))ᵀ, and
a weight column with a large s is rounded with relatively less error. AWQ (§3.2, eq. 5)
picks

    s = s_X^α,   α* = argmin_α ‖Q(W·diag(s)) (diag(s)⁻¹ Xᵀ) − W Xᵀ‖          (α on a grid in [0, 1])

with s_X the mean |x| of each input channel over the calibration tokens. The output
error of a weight difference Δ is tr(Δ H Δᵀ)/2 with H = 2XᵀX/n (the GPTQ Hessian), so the
search needs XᵀX, not the tokens: Δ = Q(W·diag(s))·diag(s)⁻¹ − W. α = 0 is s = 1, plain
round-to-nearest, so the search never does worse than RTN on the calibration data.

Then, as in the authors' released code ("auto_clip"), the range of every group is shrunk
on a grid of ratios, each group keeping the ratio with the least output error of its own
columns, ‖Δ_g X_gᵀ‖² = Δ_g H_gg Δ_gᵀ / 2. Composed with GPTQ (`awq_gptq_search`), the
scales of the best α for round-to-nearest and of α = 0 are each solved by GPTQ, and the
one with the least output error is kept; GPTQ then rounds (no clipping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import observers
from lowbit.algorithms.gptq import CALIB_DTYPES, GPTQ, gptq_quantize_group
from lowbit.errors import LowbitError
from lowbit.formats import choose_qparams_affine, dequantize_affine, num_groups, quantize_affine
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, check_finite, from_int_codes, int_qparams


@dataclass(frozen=True)
class AWQ:
    """AWQ settings: ``grid`` values of α in [0, 1) for the scale search; a clipping search over
    ``clip_grid`` ratios down to ``1 - clip_max_shrink`` (with round-to-nearest only; GPTQ chooses
    its own rounding); linears whose name matches a ``no_clip`` pattern are not clipped (q/k, whose
    errors the attention softmax amplifies, as in the paper's code). With ``gptq`` set, the scaled
    weights are rounded by GPTQ instead of round-to-nearest ("awq+gptq"). ``propagate``: what the next
    decoder layer calibrates on — the float layer's outputs ("float": one calibration pass per layer, as
    the authors' code does) or the quantised layer's ("quantized": a second pass, so later layers' searches
    see earlier layers' rounding). With GPTQ the outputs are always the quantised layer's."""

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    no_clip: tuple[str, ...] = (r"(.*\.)?(q_proj|k_proj|wq|wk)",)
    gptq: GPTQ | None = None
    propagate: str = "float"
    calib_dtype: str = "auto"
    name: str = "awq"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "no_clip", tuple(self.no_clip))
        if not isinstance(self.grid, int) or self.grid < 1:
            raise LowbitError(f"AWQ grid must be a positive integer, got {self.grid!r}.")
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise LowbitError(f"AWQ clip grid must be a positive integer, got {self.clip_grid!r}.")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise LowbitError(f"AWQ clip_max_shrink must lie in [0, 1), got {self.clip_max_shrink!r}.")
        if self.calib_dtype not in CALIB_DTYPES:
            raise LowbitError(f"calibration dtype must be one of {', '.join(CALIB_DTYPES)}, got {self.calib_dtype!r}.")
        check_propagate(self.propagate)

    @property
    def label(self) -> str:
        return "awq+gptq" if self.gptq else "awq"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["name"] = self.label
        return out


PROPAGATE = ("float", "quantized")


def check_propagate(value: str) -> None:
    if value not in PROPAGATE:
        raise LowbitError(f"propagate must be one of {', '.join(PROPAGATE)}, got {value!r}.")


def output_error(delta: Tensor, H: Tensor) -> float:
    """tr(Δ H Δᵀ) / 2 = ‖Δ Xᵀ‖² / n for H = 2XᵀX / n; Δ (R, C), H (C, C), float32."""
    return float(((delta @ H) * delta).sum()) / 2


def fake_quantize_weight(W: Tensor, spec: QuantSpec) -> Tensor:
    """Round-to-nearest quantise–dequantise of W (R, C) with the spec's observer; integer formats."""
    rows, cols = W.shape
    x = W.float().reshape(1, -1) if spec.granularity == "tensor" else W.float()
    group = spec.group_size_for(cols, rows)
    scale, zero = int_qparams(x, spec, group)
    codes = quantize_affine(x, scale, zero, spec.bits, spec.symmetric, group)
    return dequantize_affine(codes, scale, zero, group).reshape(rows, cols)


def awq_scale(x_mean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^α, normalised so that max(s)·min(s) = 1; channels never active get 1."""
    s = x_mean.float().clamp(min=1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(x_mean > 0, s, torch.ones_like(s))


def awq_search(weights: Sequence[Tensor], H: Tensor, x_mean: Tensor, spec: QuantSpec, grid: int = 20
               ) -> tuple[Tensor, float, dict[float, float]]:
    """The scale s (C,) of AWQ's grid search for the linears ``weights`` (each (R_i, C)) that read
    inputs with Hessian H (C, C) and mean magnitude ``x_mean`` (C,).

    Returns s, the chosen α and the summed output error of every α tried (α = 0 is RTN).
    """
    if spec.format != "int":
        raise LowbitError(f"AWQ searches scales for integer weights; the scheme uses {spec.format}.")
    H = H.float()
    W = torch.cat([w.float() for w in weights])  # (ΣR, C): the group shares s; rows quantise independently
    splits = [w.shape[0] for w in weights]
    errors: dict[float, float] = {}
    best_alpha, best_err = 0.0, float("inf")
    for i in range(grid):
        alpha = i / grid
        s = awq_scale(x_mean, alpha)
        Q = torch.cat([fake_quantize_weight(part, spec) for part in (W * s).split(splits)]) / s
        err = output_error(Q - W, H)
        errors[alpha] = err
        if err < best_err:
            best_alpha, best_err = alpha, err
    return awq_scale(x_mean, best_alpha), best_alpha, errors


def awq_gptq_search(weights: Sequence[Tensor], H: Tensor, x_mean: Tensor, spec: QuantSpec, gptq: GPTQ,
                    alphas: Sequence[float]) -> tuple[Tensor, float, dict[float, float]]:
    """AWQ's scale for weights that GPTQ will round: of the candidate α (0, i.e. plain GPTQ, always among
    them), the one whose GPTQ solve leaves the least output error tr(Δ H Δᵀ)/2, Δ = Q(W·diag(s))·diag(s)⁻¹ − W.

    GPTQ already moves rounding error away from the inputs that carry signal, so the α that is best for
    round-to-nearest can be worse than none; the solve on (W·diag(s), diag(s)⁻¹ H diag(s)⁻¹) says which.
    """
    errors: dict[float, float] = {}
    for alpha in sorted({0.0, *alphas}):
        s = awq_scale(x_mean, alpha)
        results = gptq_quantize_group([w.float() * s for w in weights], H / s[:, None] / s[None, :], spec,
                                      gptq.block_size, gptq.damp, gptq.act_order, gptq.static_groups)
        errors[alpha] = sum(r.error for r in results)
    best = min(errors, key=errors.__getitem__)
    return awq_scale(x_mean, best), best, errors


def hessian_group_error(H: Tensor, group_size: int) -> observers.ErrorFn:
    """Per (row, group): Δ_g H_gg Δ_gᵀ / 2, the output error of the group's columns alone."""
    C = H.shape[0]
    G = num_groups(C, group_size)
    pad = G * group_size - C
    Hp = F.pad(H.float(), (0, pad, 0, pad))  # (G·g, G·g)
    blocks = torch.stack([Hp[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(G)])  # (G, g, g)

    def error(x: Tensor, xhat: Tensor) -> Tensor:
        delta = F.pad(x.float() - xhat.float(), (0, pad)).reshape(x.shape[0], G, group_size)  # (R, G, g)
        return torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta) / 2

    return error


def awq_clip_ranges(W: Tensor, H: Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
                    ) -> tuple[Tensor, Tensor]:
    """Per-group (lo, hi) ranges of W (R, C) shrunk to the least output error under H (C, C)."""
    rows, cols = W.shape
    group = spec.group_size_for(cols, rows)
    if spec.granularity == "tensor":
        raise LowbitError("AWQ's clipping search works per channel or group, not on one per-tensor range.")

    def fake_quant(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        s, z = choose_qparams_affine(lo, hi, spec.bits, spec.symmetric, spec.torch_scale_dtype)
        return dequantize_affine(quantize_affine(v, s, z, spec.bits, spec.symmetric, group), s, z, group)

    return observers.mse_search(W.float(), group, fake_quant, grid=grid, max_shrink=max_shrink,
                                error=hessian_group_error(H, group))


def quantize_in_range(W: Tensor, spec: QuantSpec, lo: Tensor, hi: Tensor, name: str = "weight") -> QuantizedWeight:
    """Round W (R, C) to nearest with the given per-group ranges (R, G)."""
    check_finite(W, name)
    group = spec.group_size_for(W.shape[1], W.shape[0])
    scale, zero = choose_qparams_affine(lo, hi, spec.bits, spec.symmetric, spec.torch_scale_dtype)
    codes = quantize_affine(W.float(), scale, zero, spec.bits, spec.symmetric, group)
    return from_int_codes(codes, scale, zero, spec)


__all__ = ["AWQ", "awq_clip_ranges", "awq_gptq_search", "awq_scale", "awq_search", "fake_quantize_weight",
           "quantize_in_range"]
