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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import int_range
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, check_finite, from_int_codes, int_qparams


CALIB_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ settings. ``damp`` is a fraction of the mean diagonal of H added to it.

    Act-order with static groups is the default (llm-compressor's too): on the default model
    at W4 g128 (``bench/results/gptq_domains.md``, 2026-11-27) plain GPTQ calibrated on
    pydoc-calib was worse than round-to-nearest on another domain (python-license ppl 15.77
    against RTN's 12.11), act-order with static groups better than RTN on all three texts
    (12.58 / 10.97 / 8.35 against 18.40 / 12.11 / 10.87). Static groups keep the scales in
    column order, so no ``g_idx`` reaches the serving kernels.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    # dtype of the calibration forward's matmuls: "auto" is bfloat16 where the hardware
    # multiplies it natively (CUDA, CPUs with AVX512-BF16 or AMX), float32 elsewhere.
    # Hessians are accumulated in float32 and the weights stay float32 either way.
    calib_dtype: str = "auto"
    name: str = "gptq"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise LowbitError(f"GPTQ block size must be positive, got {self.block_size}.")
        if not 0 <= self.damp < 1:
            raise LowbitError(f"GPTQ damping must lie in [0, 1), got {self.damp}.")
        if self.calib_dtype not in CALIB_DTYPES:
            raise LowbitError(f"calibration dtype must be one of {', '.join(CALIB_DTYPES)}, got {self.calib_dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # Σ (w − q)² / U_ii² / 2 as the solver accumulated it
    error: float  # tr((W − Q) H (W − Q)ᵀ) / 2 = ‖(W − Q)Xᵀ‖² / n, with the undamped H
    dead_columns: int
    signal: float = 0.0  # ‖WXᵀ‖² / n: what the error is relative to


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while the context lasts.

    GPTQ's column loop is thousands of operations on one row each (a few thousand floats):
    split across threads, each pays a fork and join, and when the cores are shared with
    other work the join waits for a descheduled thread. A 3072 × 576 solve took 0.24 s on
    one thread and 2.6-6.5 s on two (this 2-core machine, load 4.5); the block updates
    between the loops are large matmuls and keep every thread.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_error(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) / 2, i.e. ‖(W − Q)Xᵀ‖² / n when H = 2XᵀX / n."""
    delta = (W - Q).float()
    return float(((delta @ H.float()) * delta).sum(dtype=torch.float64) / 2)  # float32 products, a float64 sum


def _inverse_cholesky(H: Tensor, damp: float, name: str) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU in float64, raising λ until H is positive definite.

    With J the reversal permutation and J·H·J = L·Lᵀ, H = R·Rᵀ for the upper triangular
    R = J·L·J, so H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹: one factorisation and one triangular inverse,
    without forming H⁻¹. λ goes onto J·H·J's diagonal in place (J·I·J = I), so no more
    than three (C, C) float64 matrices are alive at once: 57 MB at C = 1536.
    """
    A = H.flip(0, 1).double()  # J·H·J
    diag = A.diagonal()
    mean_diag = diag.mean().item()
    added = 0.0
    for extra in (1.0, 10.0, 100.0, 1000.0):
        lam = max(damp * extra, 1e-8) * mean_diag if damp > 0 or extra > 1 else 0.0
        diag += lam - added
        added = lam
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() == 0:
            del A
            R = L.flip(0, 1)
            del L
            eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
            return torch.linalg.solve_triangular(R, eye, upper=True)
    raise LowbitError(f"the Hessian of {name} is not positive definite even with strong damping.")


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, name: str = "weight") -> GPTQResult:
    """Quantise W (R, C) given its input Hessian H (C, C); integer formats only."""
    return gptq_quantize_group([W], H, spec, block_size, damp, act_order, static_groups, [name])[0]


def gptq_quantize_group(weights: Sequence[Tensor], H: Tensor, spec: QuantSpec, block_size: int = 128,
                        damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                        names: Sequence[str] | None = None) -> list[GPTQResult]:
    """Quantise several weights that read the same input (q/k/v, gate/up) in one solve.

    GPTQ treats the rows of W independently given H, so stacking the weights' rows and
    solving once gives each weight exactly what its own solve would, with one pass over
    the columns instead of one per weight.
    """
    names = list(names) if names is not None else [f"weight{i}" for i in range(len(weights))]
    if len(weights) > 1 and spec.granularity == "tensor":  # one scale per tensor: no shared solve
        return [gptq_quantize(W, H, spec, block_size, damp, act_order, static_groups, name)
                for W, name in zip(weights, names)]
    if spec.format != "int":
        raise LowbitError(f"GPTQ quantises integer formats; {names[0]} asks for {spec.format}.")
    for W, name in zip(weights, names):
        check_finite(W, name)
        if W.dim() != 2 or W.shape[1] != H.shape[0]:
            raise LowbitError(f"{name} has shape {tuple(W.shape)}; its Hessian is {tuple(H.shape)}.")
    if not torch.isfinite(H).all():
        raise LowbitError(f"the Hessian of {names[0]} contains NaN or Inf; the calibration activations overflowed.")
    W_in = torch.cat([W.detach().float() for W in weights]) if len(weights) > 1 else weights[0].detach().float()
    H_in = H.detach().float()
    codes, Q, scale, zero, col_group, loss, dead = _solve(W_in, H_in, spec, block_size, damp, act_order,
                                                          static_groups, names[0])
    g_idx = col_group if (act_order and spec.granularity == "group" and not static_groups) else None
    results, start = [], 0
    for W in weights:
        rows = slice(start, start + W.shape[0])
        start += W.shape[0]
        weight = from_int_codes(codes[rows], scale[rows], None if zero is None else zero[rows], spec, g_idx=g_idx)
        w = W.detach().float()
        results.append(GPTQResult(weight, loss if len(weights) == 1 else float("nan"),
                                  output_error(w, Q[rows], H_in), dead,
                                  output_error(w, torch.zeros_like(w), H_in)))
    return results


def _solve(W_in: Tensor, H_in: Tensor, spec: QuantSpec, block_size: int, damp: float, act_order: bool,
           static_groups: bool, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, float, int]:
    """The column loop: codes (R, C) int32, Q (R, C), scale and zero (R, G), group of each column, loss, dead."""
    rows, cols = W_in.shape
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
    diag = U.diagonal().tolist()

    # Keep every dynamic group inside one lazy block, so its range is read from current weights.
    B = max(g, block_size // g * g) if dynamic and g <= block_size else block_size
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    # Work on Wᵀ (C, R): a column of W is a contiguous row here, which the per-column loop needs.
    Wt = W.T.contiguous()
    Qt = torch.empty_like(Wt)
    codes_t = torch.empty(cols, rows, dtype=torch.float32)
    groups: list[tuple[Tensor, Tensor | None]] = list(fixed)
    # group id of each permuted column: fixed up front, or assigned as dynamic groups are reached
    group_of = (perm // g).tolist() if grouped and not dynamic else [0] * cols
    loss = 0.0
    s = z = None
    current = -1
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = Wt[i1:i2].clone()  # (b, R)
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        with one_thread():
            for i in range(i2 - i1):  # tiny ops, one after another: see one_thread
                p = i1 + i
                if dynamic and p % g == 0:
                    groups.append(int_qparams(W1[i : i + g].T, spec, min(g, cols - p)))
                    group_of[p : p + g] = [len(groups) - 1] * len(group_of[p : p + g])
                if group_of[p] != current:
                    current = group_of[p]
                    scale, zero = groups[current]
                    s = scale[:, 0].float()
                    z = torch.zeros_like(s) if zero is None else zero[:, 0].float()
                w = W1[i]
                c = codes_t[p]
                torch.div(w, s, out=c).round_().add_(z).clamp_(qmin, qmax)
                q = torch.mul(c - z, s, out=Qt[p])
                err = torch.sub(w, q, out=Err1[i]).div_(diag[p])
                W1[i:].addmm_(U1[i, i:, None], err[None], alpha=-1)
        loss += float(Err1.pow(2).sum()) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    codes, Q = codes_t.T.to(torch.int32), Qt.T
    col_group = torch.tensor(group_of, dtype=torch.long)

    invperm = torch.argsort(perm)
    codes, Q, col_group = codes[:, invperm], Q[:, invperm], col_group[invperm]
    scale = torch.cat([s for s, _ in groups], dim=1)  # (R, G)
    zero = None if spec.symmetric else torch.cat([z for _, z in groups], dim=1)  # type: ignore[misc]
    if spec.granularity == "tensor":
        scale, zero = scale[:1], None if zero is None else zero[:1]
    return codes, Q, scale, zero, col_group, loss, int(dead.sum())
