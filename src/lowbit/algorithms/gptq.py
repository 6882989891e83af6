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

What depends on H alone — the column order and the inverse-Hessian factor — is computed once
for all the weights that read the same input (`gptq_factor`), in float64 like the reference
results it replaced, in place (one (C, C) float64 matrix besides H, rounded to float32 in its
own memory when done). Each weight then runs its own column loop (`gptq_solve`): rows are
independent given H, so it gets the codes a stacked solve would give it while only its own
copies are in memory (small weights are still stacked: `gptq_solve_group`). Streaming GPTQ on
a 7B-shaped checkpoint (bench/results/scale.md) peaked at 8.15 GB of process memory with the
stacked solves and float64 inverse this replaced, 2.80 GB with these.
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
from lowbit.memory import discard_pages
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
    other work the join waits for a descheduled thread. A random 3072 × 576 solve took 0.24 s
    on one thread and 2.6-6.5 s on two (2026-11-27, the 2-core development machine at load 4.5,
    commit 5dccaec); the block updates between the loops are large matmuls and keep every thread.
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


def output_error(W: Tensor, Q: Tensor | None, H: Tensor, row_weights: Tensor | None = None) -> float:
    """tr((W − Q) H (W − Q)ᵀ) / 2, i.e. ‖(W − Q)Xᵀ‖² / n when H = 2XᵀX / n; with ``Q`` None, the signal
    tr(W H Wᵀ) / 2; with ``row_weights`` (one per output channel) Σ_j w_j·[(W − Q) H (W − Q)ᵀ]_jj / 2.
    A block of rows at a time, from H's block upper triangle (half the products of the whole form):
    float32 products, float64 sums."""
    H = H.float()
    C = H.shape[0]
    total = 0.0
    for r in range(0, W.shape[0], ERROR_ROWS):
        M = W[r : r + ERROR_ROWS].float()
        if Q is not None:
            M = M - Q[r : r + ERROR_ROWS].float()
        rows = torch.zeros(M.shape[0], dtype=torch.float64)
        for s in range(0, C, ERROR_BLOCK):
            e = min(s + ERROR_BLOCK, C)
            P = M[:, s:e] @ H[s:e, s:]  # (rows, C − s): the diagonal block and those right of it
            rows += (P[:, : e - s] * M[:, s:e]).sum(1, dtype=torch.float64)
            rows += 2 * (P[:, e - s :] * M[:, e:]).sum(1, dtype=torch.float64)
        if row_weights is not None:
            rows *= row_weights[r : r + ERROR_ROWS].double()
        total += float(rows.sum())
    return total / 2


FACTOR_BLOCK = 512  # rows per block of the factorisation and the triangular inverse
ERROR_ROWS, ERROR_BLOCK = 1024, 1024  # rows and columns per block of the reported errors' products


@dataclass
class GPTQFactor:
    """What GPTQ derives from a Hessian alone, shared by every weight that reads the same input (q/k/v, gate/up).

    With P the column order, J the reversal and λ the damping, J·(P·H·Pᵀ + λI)·J = L·Lᵀ, and
    ``inverse`` holds L⁻¹ (lower triangular; computed in float64, kept in float32). The upper
    Cholesky factor of the damped inverse Hessian that Algorithm 1 reads is then U = J·L⁻¹·J:
    (P·H·Pᵀ + λI)⁻¹ = UᵀU — one factorisation and one triangular inverse, without forming H⁻¹.
    Its rows come out block by block (`rows`) as the column loop uses them. ``H`` is the
    undamped Hessian in natural order, kept for the reported output errors.
    """

    H: Tensor
    perm: Tensor
    dead: Tensor
    inverse: Tensor
    damping: float
    act_order: bool = False

    @property
    def columns(self) -> int:
        return self.H.shape[0]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of U (permuted order), float32."""
        C = self.columns
        return self.inverse[C - stop : C - start].flip(0, 1).float()


def _permuted_flipped(H: Tensor, order: Tensor, dead: Tensor) -> Tensor:
    """H[order][:, order] in float64 with 1 on the diagonal of the dead inputs, a block of rows at a time."""
    C = H.shape[0]
    A = torch.empty(C, C, dtype=torch.float64, device=H.device)
    for s in range(0, C, FACTOR_BLOCK):
        A[s : s + FACTOR_BLOCK] = H.index_select(0, order[s : s + FACTOR_BLOCK]).index_select(1, order)
    A.diagonal()[dead[order]] = 1.0
    return A


def _cholesky_(A: Tensor) -> bool:
    """A = L·Lᵀ in place (L in the lower triangle, zeros above), a block column at a time: right-looking,
    with only the lower triangle updated; False if A is not positive definite (A is then spoilt).

    ``torch.linalg.cholesky`` would allocate a second (C, C) float64 matrix: 0.97 GB at C = 11008.
    """
    C = A.shape[0]
    for s in range(0, C, FACTOR_BLOCK):
        e = min(s + FACTOR_BLOCK, C)
        Lkk, info = torch.linalg.cholesky_ex(A[s:e, s:e])
        if info.item() != 0:
            return False
        A[s:e, s:e] = Lkk
        if e == C:
            break
        A[s:e, e:] = 0.0
        panel = torch.linalg.solve_triangular(Lkk.T, A[e:, s:e], upper=True, left=False)  # A_ik·L_kk⁻ᵀ
        A[e:, s:e] = panel
        for j in range(e, C, FACTOR_BLOCK):  # the trailing lower triangle, a block column at a time
            j2 = min(j + FACTOR_BLOCK, C)
            A[j:, j:j2].addmm_(panel[j - e :], panel[j - e : j2 - e].T, alpha=-1)
    return True


def _invert_lower_(L: Tensor) -> None:
    """L⁻¹ of a lower triangular L, in place, a block of rows at a time: row block i of L⁻¹ is
    −L_ii⁻¹·L[i, :s]·L⁻¹[:s, :s], and the rows above it already hold L⁻¹'s. About C³/3 flops, in matrix
    products that skip L⁻¹'s zero upper triangle (a solve against the identity would take C³)."""
    C = L.shape[0]
    for s in range(0, C, FACTOR_BLOCK):
        e = min(s + FACTOR_BLOCK, C)
        eye = torch.eye(e - s, dtype=L.dtype, device=L.device)
        Lii_inv = torch.linalg.solve_triangular(L[s:e, s:e], eye, upper=False)
        if s:
            T = torch.empty(e - s, s, dtype=L.dtype, device=L.device)
            for k in range(0, s, FACTOR_BLOCK):  # L⁻¹'s block column k is zero above row k
                k2 = min(k + FACTOR_BLOCK, s)
                torch.mm(L[s:e, k:s], L[k:s, k:k2], out=T[:, k:k2])
            L[s:e, :s] = Lii_inv @ T.neg_()
        L[s:e, s:e] = Lii_inv


def _narrow_(A: Tensor) -> Tensor:
    """A float64 (C, C) matrix rounded to float32 in the first half of its own storage, whose second half is
    handed back: no second matrix. Rows go in ascending blocks, each read whole before it is written, and
    float32 row r lands on float64 rows r/2 to (r+1)/2, which are read by then."""
    C = A.shape[0]
    out = A.view(-1).view(torch.float32)[: C * C].view(C, C)
    for s in range(0, C, FACTOR_BLOCK):
        out[s : s + FACTOR_BLOCK] = A[s : s + FACTOR_BLOCK].float()
    discard_pages(A.view(-1).view(torch.float32)[C * C :])
    return out


def gptq_factor(H: Tensor, damp: float = 0.01, act_order: bool = False, name: str = "weight") -> GPTQFactor:
    """Column order and inverse-Hessian factor of H (C, C) for `gptq_solve`, in float64, raising λ until
    H + λI is positive definite. Memory: H and one (C, C) float64 matrix, half of which is handed back at the end."""
    if not torch.isfinite(H).all():
        raise LowbitError(f"the Hessian of {name} contains NaN or Inf; the calibration activations overflowed.")
    H = H.detach().float()
    C = H.shape[0]
    dead = H.diagonal() == 0
    diag = H.diagonal().clone()
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(C, device=H.device)
    order = perm.flip(0)
    mean_diag = diag.double().mean().item()  # of the diagonal the factorisation sees (dead inputs at 1)
    for extra in (1.0, 10.0, 100.0, 1000.0):
        A = _permuted_flipped(H, order, dead)
        lam = max(damp * extra, 1e-8) * mean_diag if damp > 0 or extra > 1 else 0.0
        A.diagonal().add_(lam)
        if _cholesky_(A):
            _invert_lower_(A)
            return GPTQFactor(H, perm, dead, _narrow_(A), lam, act_order)
        del A
    raise LowbitError(f"the Hessian of {name} is not positive definite even with strong damping.")


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, name: str = "weight") -> GPTQResult:
    """Quantise W (R, C) given its input Hessian H (C, C); integer formats only."""
    return gptq_quantize_group([W], H, spec, block_size, damp, act_order, static_groups, [name])[0]


def gptq_quantize_group(weights: Sequence[Tensor], H: Tensor, spec: QuantSpec, block_size: int = 128,
                        damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                        names: Sequence[str] | None = None) -> list[GPTQResult]:
    """Quantise several weights that read the same input (q/k/v, gate/up): one factorisation of H, then
    each weight's column loop in turn.

    GPTQ treats the rows of W independently given H, so each weight gets exactly what a solve of
    its rows stacked with the others' would give it; one at a time, the solve holds one weight's
    copies (a 7B model's gate and up stacked: 22016 × 4096, four float32 copies of 0.36 GB).
    """
    names = list(names) if names is not None else [f"weight{i}" for i in range(len(weights))]
    factor = gptq_factor(H, damp, act_order, names[0])
    return gptq_solve_group(factor, weights, spec, block_size, static_groups, names)


STACK_BYTES = 64 << 20  # weights sharing a factor are solved stacked up to this size (float32), one by one above


def gptq_solve_group(factor: GPTQFactor, weights: Sequence[Tensor], spec: QuantSpec, block_size: int = 128,
                     static_groups: bool = False, names: Sequence[str] | None = None) -> list[GPTQResult]:
    """`gptq_solve` for weights that share ``factor``: small ones stacked into one column loop (its per-column
    steps are the cost when rows are few), large ones one at a time (memory). Rows are independent given
    H, so either way each weight gets the codes and the loss its own solve gives it."""
    names = list(names) if names is not None else [f"weight{i}" for i in range(len(weights))]
    if spec.format != "int":
        raise LowbitError(f"GPTQ quantises integer formats; {names[0]} asks for {spec.format}.")
    for W, name in zip(weights, names):
        check_finite(W, name)
        if W.dim() != 2 or W.shape[1] != factor.columns:
            raise LowbitError(f"{name} has shape {tuple(W.shape)}; its Hessian is {tuple(factor.H.shape)}.")
    stack = (spec.granularity != "tensor"  # one scale per tensor: no shared solve
             and sum(W.shape[0] for W in weights) * factor.columns * 4 <= STACK_BYTES)
    batches = [list(range(len(weights)))] if stack else [[i] for i in range(len(weights))]
    with_g_idx = factor.act_order and spec.granularity == "group" and not static_groups
    results: list[GPTQResult | None] = [None] * len(weights)
    for batch in batches:
        W_in = torch.cat([weights[i].detach().float() for i in batch]) if len(batch) > 1 else weights[batch[0]].detach()
        codes, scale, zero, col_group, loss_rows = _column_loop(W_in, factor, spec, block_size, static_groups)
        del W_in
        parts, start = [], 0
        for i in batch:
            part = slice(start, start + weights[i].shape[0])
            start = part.stop
            parts.append((i, part, from_int_codes(codes[part], scale[part], None if zero is None else zero[part],
                                                  spec, g_idx=col_group if with_g_idx else None)))
        del codes
        for i, part, weight in parts:
            W = weights[i].detach()
            results[i] = GPTQResult(weight, float(loss_rows[part].sum()) / 2,
                                    output_error(W, weight.dequantize(torch.float32), factor.H),
                                    int(factor.dead.sum()), output_error(W, None, factor.H))
    return results  # type: ignore[return-value]


def gptq_solve(factor: GPTQFactor, W: Tensor, spec: QuantSpec, block_size: int = 128, static_groups: bool = False,
               name: str = "weight") -> GPTQResult:
    """GPTQ's column loop for one weight W (R, C) (any float dtype; solved in float32) with a factor of its
    input Hessian (`gptq_factor`); integer formats only."""
    return gptq_solve_group(factor, [W], spec, block_size, static_groups, [name])[0]


def _column_loop(W_in: Tensor, factor: GPTQFactor, spec: QuantSpec, block_size: int, static_groups: bool
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """The column loop: codes (R, C) int32, scale and zero (R, G), group of each column, and each row's
    Σ (w − q)² / U_ii² (float64; the loss is half its sum)."""
    rows, cols = W_in.shape
    perm, dead = factor.perm, factor.dead
    grouped = spec.granularity == "group"
    g = int(spec.group_size) if grouped else cols
    dynamic = grouped and not static_groups
    # Fixed parameters: per channel / tensor, or static groups from the weights in natural order.
    fixed: list[tuple[Tensor, Tensor | None]] = []
    W = W_in.float()
    if dead.any():
        W = W.clone() if W is W_in else W
        W[:, dead] = 0.0
    if spec.granularity == "tensor":
        s, z = int_qparams(W.reshape(1, -1), spec, rows * cols)
        fixed = [(s.expand(rows, 1), None if z is None else z.expand(rows, 1))]
    elif not dynamic:
        fixed = [int_qparams(W[:, k : k + g], spec, min(g, cols - k)) for k in range(0, cols, g)]
    # Work on Wᵀ (C, R) in the visiting order: a column of W is a contiguous row here, which the loop needs.
    Wt = W.T.index_select(0, perm)
    del W

    # Keep every dynamic group inside one lazy block, so its range is read from current weights.
    B = max(g, block_size // g * g) if dynamic and g <= block_size else block_size
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    codes_t = torch.empty(cols, rows, dtype=torch.float32)
    groups: list[tuple[Tensor, Tensor | None]] = list(fixed)
    # group id of each permuted column: fixed up front, or assigned as dynamic groups are reached
    group_of = (perm // g).tolist() if grouped and not dynamic else [0] * cols
    loss_rows = torch.zeros(rows, dtype=torch.float64)
    s = z = None
    current = -1
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        U = factor.rows(i1, i2)  # (b, C): U[i1:i2, :]
        U1 = U[:, i1:i2]
        diag = U1.diagonal().tolist()
        W1 = Wt[i1:i2].clone()  # (b, R)
        Err1 = torch.empty_like(W1)
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
                q = (c - z).mul_(s)
                err = torch.sub(w, q, out=Err1[i]).div_(diag[i])
                W1[i:].addmm_(U1[i, i:, None], err[None], alpha=-1)
        loss_rows += Err1.pow(2).sum(0, dtype=torch.float64)
        Wt[i2:].addmm_(U[:, i2:].T, Err1, alpha=-1)
    del Wt
    col_group = torch.tensor(group_of, dtype=torch.long)
    invperm = torch.argsort(perm)
    codes = codes_t.index_select(0, invperm)
    del codes_t
    codes = codes.T.to(torch.int32, memory_format=torch.contiguous_format)
    col_group = col_group[invperm]
    scale = torch.cat([s for s, _ in groups], dim=1)  # (R, G)
    zero = None if spec.symmetric else torch.cat([z for _, z in groups], dim=1)  # type: ignore[misc]
    if spec.granularity == "tensor":
        scale, zero = scale[:1], None if zero is None else zero[:1]
    return codes, scale, zero, col_group, loss_rows
