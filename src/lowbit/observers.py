"""Range observers: choose the (min, max) of each quantisation group.

- `minmax`: the group's extremes; nothing is clipped.
- `percentile`: the ``1 - q`` and ``q`` quantiles; rare outliers are clipped.
- `mse_search`: shrink the min-max range over a grid of ratios and keep, per group, the
  one whose quantise–dequantise error ``Σ|x − x̂|^norm`` is least; the grid search used by
  GPTQ's reference code (Frantar et al., arXiv 2210.17323) for "MSE-optimal clipping".

All take a (R, C) tensor and a group size and return (xmin, xmax), each (R, G).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import group_minmax, num_groups

FakeQuant = Callable[[Tensor, Tensor, Tensor], Tensor]
ErrorFn = Callable[[Tensor, Tensor], Tensor]  # (x, x̂) → error per group, (R, G)


def minmax(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Per-group minimum and maximum of ``x`` (R, C), each (R, G) float32."""
    return group_minmax(x.float(), group_size)


def _kth(values: Tensor, k: int) -> Tensor:
    return values.kthvalue(k, dim=-1).values


def percentile(x: Tensor, group_size: int, q: float = 0.999) -> tuple[Tensor, Tensor]:
    """Per-group (1 − q, q) order statistics, each (R, G) float32.

    For a group of n values the upper bound is the k-th smallest with k = round(q·(n − 1)) + 1
    (nearest rank), the lower bound the k-th largest; the ragged last group uses its own n.
    """
    if not 0.5 < q <= 1.0:
        raise LowbitError(f"percentile must lie in (0.5, 1], got {q!r}.")
    x = x.float()
    rows, cols = x.shape
    num_groups(cols, group_size)  # validates group_size
    full = cols // group_size * group_size
    parts = [(x.new_empty(rows, 0), x.new_empty(rows, 0))]  # (R, 0) each, so cat works for C = 0
    for block, size in ((x[:, :full], group_size), (x[:, full:], cols - full)):
        if size == 0 or block.shape[1] == 0:
            continue
        groups = block.reshape(rows, -1, size)
        k_hi = min(size, max(1, round(q * (size - 1)) + 1))
        parts.append((_kth(groups, size - k_hi + 1), _kth(groups, k_hi)))
    lo = torch.cat([p[0] for p in parts], dim=1)
    hi = torch.cat([p[1] for p in parts], dim=1)
    return lo, hi


def group_error(x: Tensor, xhat: Tensor, group_size: int, norm: float) -> Tensor:
    """Σ |x − x̂|^norm per group, (R, G); the ragged last group counts only real columns."""
    err = (x.float() - xhat.float()).abs().pow(norm)
    pad = num_groups(x.shape[1], group_size) * group_size - x.shape[1]
    return F.pad(err, (0, pad)).reshape(x.shape[0], -1, group_size).sum(dim=-1)


def mse_search(x: Tensor, group_size: int, fake_quant: FakeQuant, grid: int = 100, max_shrink: float = 0.8,
               norm: float = 2.4, error: ErrorFn | None = None) -> tuple[Tensor, Tensor]:
    """The shrunk min-max range with the least quantisation error per group.

    Ratios p run over ``grid`` evenly spaced values from 1 down to ``1 - max_shrink``;
    each group keeps the first (p·xmin, p·xmax) with the least error — Σ|x − x̂|^norm, or
    ``error(x, x̂)`` when given (AWQ weighs it by the layer's inputs) — so p = 1 (plain
    min-max) wins every tie and the result is never worse than min-max.
    """
    if not isinstance(grid, int) or grid < 1:
        raise LowbitError(f"mse_search grid must be a positive integer, got {grid!r}.")
    if not 0.0 <= max_shrink < 1.0:
        raise LowbitError(f"mse_search max_shrink must lie in [0, 1), got {max_shrink!r}.")
    if not norm > 0:
        raise LowbitError(f"mse_search norm must be positive, got {norm!r}.")
    x = x.float()
    xmin, xmax = group_minmax(x, group_size)
    best_lo, best_hi = xmin.clone(), xmax.clone()
    best_err = torch.full_like(xmin, float("inf"))
    for ratio in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        lo, hi = xmin * ratio, xmax * ratio
        xhat = fake_quant(x, lo, hi)
        err = group_error(x, xhat, group_size, norm) if error is None else error(x, xhat)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


__all__ = ["ErrorFn", "group_error", "minmax", "mse_search", "percentile"]
