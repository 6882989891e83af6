"""LDLQ with a vector codebook: GPTQ's error feedback over blocks of 8 columns rounded jointly to E8P.

QuIP (Chee et al. 2023, arXiv 2307.13304, §3) names GPTQ's column loop LDLQ and shows it is the
optimal adaptive rounding with linear feedback: with H = L·D·Lᵀ, column k is rounded after the
errors of the columns before it have been fed into it. QuIP# (Tseng et al. 2024, arXiv
2402.04396, §4.3) rounds g = 8 columns at a time to the E8P codebook (`lowbit.formats.e8p`) with
the block version of the same feedback. In GPTQ's terms (Frantar et al., arXiv 2210.17323,
Alg. 1), with U the upper Cholesky factor of the damped H⁻¹ = UᵀU, after the columns B of a block
are rounded to Q_B the remaining columns R move by the Optimal Brain Surgeon update for fixing
B jointly:

    E   = (W_B − Q_B) · U_BB⁻¹           (a triangular solve)
    W_R −= E · U_BR

which for |B| = 1 is GPTQ's err = (w − q)/U_ii, W_R −= err·U_iR. Updates are lazy in blocks of
``block_size`` columns as in GPTQ. Each row is divided by its own scale first (its RMS over
``rms_target``, a float16 per row), so the codebook sees unit-variance rows; ``rms_target`` is
searched on a few rows by plain nearest-codeword error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowbit.algorithms.gptq import gptq_factor, output_error
from lowbit.errors import LowbitError
from lowbit.formats import e8p
from lowbit.tensor import check_finite

RMS_TARGETS = (0.85, 0.95, 1.05, 1.15, 1.25)


@dataclass(frozen=True)
class E8P:
    """QuIP#-style quantisation: randomised-Hadamard incoherence (`lowbit.nn.incoherent`), then LDLQ to
    the E8P codebook, 2 bits per weight plus a float16 scale per row and the transforms' sign bits."""

    damp: float = 0.01
    block_size: int = 128
    seed: int = 0  # of the randomised Hadamard transforms
    candidates: int = 8  # source vectors whose sign-parity penalty `e8p.nearest` evaluates
    name: str = "e8p"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise LowbitError(f"E8P damping must lie in [0, 1), got {self.damp}.")
        if self.block_size <= 0 or self.block_size % e8p.DIM:
            raise LowbitError(f"E8P block size must be a positive multiple of {e8p.DIM}, got {self.block_size}.")
        if not 1 <= self.candidates <= e8p.SOURCE_SIZE:
            raise LowbitError(f"E8P candidates must lie in 1..{e8p.SOURCE_SIZE}, got {self.candidates}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class E8PWeight:
    """A weight (R, C) as E8P codes: ``codes`` (R, C/8) int16, ``scale`` (R,) float16; W ≈ codeword · scale."""

    codes: Tensor
    scale: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * e8p.DIM

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reference decoder: rows of the full 65536-entry codebook, times the row scales."""
        R, C = self.shape
        table = e8p.codebook().to(self.codes.device)
        W = table[self.codes.long() & 0xFFFF].reshape(R, C)
        return (W * self.scale.float()[:, None]).to(dtype)


@dataclass
class LDLQResult:
    weight: E8PWeight
    error: float  # tr((W − Q) H (W − Q)ᵀ) / 2 with the undamped H
    signal: float  # tr(W H Wᵀ) / 2
    rms_target: float


def _row_scales(W: Tensor, candidates: int) -> tuple[Tensor, float]:
    """Per-row float16 scales RMS(row) / t, t from `RMS_TARGETS` by nearest-codeword error on ≤ 64 rows."""
    rms = W.pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
    sample = W[torch.linspace(0, W.shape[0] - 1, min(64, W.shape[0])).long()]
    sample_rms = sample.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    best, best_t = None, RMS_TARGETS[0]
    for t in RMS_TARGETS:
        s = sample_rms / t
        _, q = e8p.nearest((sample / s).reshape(-1, e8p.DIM), candidates=candidates)
        err = float(((q.reshape(sample.shape) * s - sample) ** 2).sum())
        if best is None or err < best:
            best, best_t = err, t
    scale = (rms / best_t).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    return scale, best_t


def ldlq_e8p(W_in: Tensor, H: Tensor, damp: float = 0.01, block_size: int = 128, candidates: int = 8,
             name: str = "weight") -> LDLQResult:
    """Round W (R, C) to E8P codes given its input Hessian H (C, C) by block LDLQ; C a multiple of 8."""
    check_finite(W_in, name)
    if W_in.dim() != 2 or W_in.shape[1] % e8p.DIM:
        raise LowbitError(f"{name} has shape {tuple(W_in.shape)}; E8P needs 2-D weights with a multiple of "
                          f"{e8p.DIM} input columns.")
    if H.shape != (W_in.shape[1], W_in.shape[1]) or not torch.isfinite(H).all():
        raise LowbitError(f"the Hessian of {name} has shape {tuple(H.shape)} or non-finite entries.")
    R, C = W_in.shape
    factor = gptq_factor(H, damp, name=name)  # natural column order: U = factor.rows(0, C), H⁻¹ = UᵀU
    U = factor.rows(0, C)
    W = W_in.detach().float().clone()
    W[:, factor.dead] = 0.0
    scale, target = _row_scales(W, candidates)
    W /= scale.float()[:, None]
    codes = torch.empty(R, C // e8p.DIM, dtype=torch.int16)
    B = block_size
    for i1 in range(0, C, B):
        i2 = min(i1 + B, C)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(0, i2 - i1, e8p.DIM):
            k = j + e8p.DIM
            c, q = e8p.nearest(W1[:, j:k], candidates=candidates)
            codes[:, (i1 + j) // e8p.DIM] = c
            E = torch.linalg.solve_triangular(U1[j:k, j:k], W1[:, j:k] - q, upper=True, left=False)
            Err1[:, j:k] = E
            W1[:, k:] -= E @ U1[j:k, k:]
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    weight = E8PWeight(codes, scale)
    error = output_error(W_in.detach(), weight.dequantize(), H)
    signal = output_error(W_in.detach(), None, H)
    return LDLQResult(weight, error, signal, target)
