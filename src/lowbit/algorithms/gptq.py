"""GPTQ: round each weight column in turn and push its error onto the columns not yet done.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv 2210.17323. For one linear layer
with weight W (R, C) and input Hessian H = 2·XᵀX / n (C, C), GPTQ quantises the columns
of W in order; after column i is rounded to q, the remaining columns receive the update
that minimises the layer's output error ‖(W − Q)Xᵀ‖² given q (Optimal Brain Surgeon):

    err   = (w_i − q_i) / U_ii
    W_i:  -= err · U_i,i:            with U the upper Cholesky factor of H⁻¹ (Alg. 1)

Updates are applied lazily in blocks of ``block_size`` columns (§4, "lazy batch"). The
accumulated Σ (w_i − q_i)² / U_ii² / 2 equals the exact output error tr(ΔHΔᵀ) / 2 for the
damped H (a test checks this against a float64 implementation).

Variants: ``act_order`` visits columns by descending diag(H) (§4, "desc_act"); group
scales are then either computed as the groups are reached in that order, which needs a
per-column group index ``g_idx`` at inference, or fixed beforehand from the original
weights in natural column order (``static_groups``), which keeps groups contiguous as
serving kernels prefer. Dead inputs (diag(H) = 0) are zeroed as in the paper's code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import int_range
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, check_finite, from_int_codes, int_qparams


@dataclass(frozen=True)
class GPTQ:
    """GPTQ settings. ``damp`` is a fraction of the mean diagonal of H added to it."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    name: str = "gptq"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise LowbitError(f"GPTQ block size must be positive, got {self.block_size}.")
        if not 0 <= self.damp < 1:
            raise LowbitError(f"GPTQ damping must lie in [0, 1), got {self.damp}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # Σ (w − q)² / U_ii² / 2 as the solver accumulated it
    error: float  # tr((W − Q) H (W − Q)ᵀ) / 2 = ‖(W − Q)Xᵀ‖² / n, with the undamped H
    dead_columns: int
    signal: float = 0.0  # ‖WXᵀ‖² / n: what the error is relative to


def output_error(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) / 2, i.e. ‖(W − Q)Xᵀ‖² / n when H = 2XᵀX / n."""
    delta = (W - Q).double()
    return float(((delta @ H.double()) * delta).sum() / 2)


def _inverse_cholesky(H: Tensor, damp: float, name: str) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ in float64, raising λ until H is positive definite."""
    H64 = H.double()
    mean_diag = H64.diagonal().mean().item()
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    for extra in (1.0, 10.0, 100.0, 1000.0):
        lam = max(damp * extra, 1e-8) * mean_diag if damp > 0 or extra > 1 else 0.0
        L, info = torch.linalg.cholesky_ex(H64 + lam * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0:
                return U
    raise LowbitError(f"the Hessian of {name} is not positive definite even with strong damping.")


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, name: str = "weight") -> GPTQResult:
    """Quantise W (R, C) given its input Hessian H (C, C); integer formats only."""
    if spec.format != "int":
        raise LowbitError(f"GPTQ quantises integer formats; {name} asks for {spec.format}.")
    check_finite(W, name)
    if not torch.isfinite(H).all():
        raise LowbitError(f"the Hessian of {name} contains NaN or Inf; the calibration activations overflowed.")
    rows, cols = W.shape
    W_in, H_in = W.detach().float(), H.detach().float()
    W, H = W_in.clone(), H_in.clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    grouped = spec.granularity == "group"
    g = int(spec.group_size) if grouped else cols
    dynamic = grouped and not static_groups
    # Fixed parameters: per channel / tensor, or static groups from the weights in natural order.
    fixed: list[tuple[Tensor, Tensor | None]] = []
    if spec.granularity == "tensor":
        s, z = int_qparams(W.reshape(1, -1), spec, rows * cols)
        fixed = [(s.expand(rows, 1), None if z is None else z.expand(rows, 1))]
    elif not dynamic:
        fixed = [int_qparams(W[:, k : k + g], spec, min(g, cols - k)) for k in range(0, cols, g)]

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp, name).float()  # (C, C) upper

    # Keep every dynamic group inside one lazy block, so its range is read from current weights.
    B = max(g, block_size // g * g) if dynamic and g <= block_size else block_size
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    # Work on Wᵀ (C, R): a column of W is a contiguous row here, which the per-column loop needs.
    Wt = W.T.contiguous()
    Qt = torch.zeros_like(Wt)
    codes_t = torch.zeros(cols, rows, dtype=torch.float32)
    groups: list[tuple[Tensor, Tensor | None]] = list(fixed)
    col_group = torch.zeros(cols, dtype=torch.long)  # group id of each permuted column
    if not dynamic and spec.granularity == "group":
        col_group = perm // g
    loss = 0.0
    s = z = None
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = Wt[i1:i2].clone()  # (b, R)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            if dynamic and p % g == 0:
                groups.append(int_qparams(W1[i : i + g].T, spec, min(g, cols - p)))
                col_group[p : p + g] = len(groups) - 1
            if dynamic or spec.granularity == "group" or s is None:
                scale, zero = groups[int(col_group[p])]
                s = scale[:, 0].float()
                z = torch.zeros_like(s) if zero is None else zero[:, 0].float()
            w = W1[i]
            c = (torch.round(w / s) + z).clamp_(qmin, qmax)
            q = (c - z) * s
            codes_t[p] = c
            Qt[p] = q
            err = (w - q) / U1[i, i]
            Err1[i] = err
            W1[i:] -= U1[i, i:, None] * err[None, :]
        loss += float(Err1.pow(2).sum()) / 2
        Wt[i2:] -= U[i1:i2, i2:].T @ Err1
    codes, Q = codes_t.T.to(torch.int32), Qt.T

    invperm = torch.argsort(perm)
    codes, Q, col_group = codes[:, invperm], Q[:, invperm], col_group[invperm]
    scale = torch.cat([s for s, _ in groups], dim=1)  # (R, G)
    zero = None if spec.symmetric else torch.cat([z for _, z in groups], dim=1)  # type: ignore[misc]
    if spec.granularity == "tensor":
        scale, zero = scale[:1], None if zero is None else zero[:1]
    g_idx = col_group if (act_order and dynamic) else None
    weight = from_int_codes(codes, scale, zero, spec, g_idx=g_idx)
    return GPTQResult(weight, loss, output_error(W_in, Q, H_in), int(dead.sum()),
                      output_error(W_in, torch.zeros_like(W_in), H_in))
