"""Hadamard transforms: the fast Walsh–Hadamard transform, Paley matrices, randomised Hadamards.

A Hadamard matrix H (n, n) has ±1 entries and H·Hᵀ = n·I, so H/√n is orthogonal. Multiplying
a weight by a *randomised* Hadamard H·diag(s)/√n (s random signs) spreads every weight's
magnitude over all coordinates, which is what incoherence processing (QuIP, Chee et al.
2023, arXiv 2307.13304; QuIP#, Tseng et al. 2024, arXiv 2402.04396, §3) and rotations of the
residual stream (QuaRot, Ashkboos et al. 2024, arXiv 2404.00456) rely on.

Sizes. n = m·2ᵏ is supported when m has a Hadamard matrix built here: m = 1, m = q + 1 for a
prime q ≡ 3 (mod 4) (Paley I: 4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, …) or
m = 2(q + 1) for a prime q ≡ 1 (mod 4) (Paley II: 12, 20, 28, 36, 60, 76, 84, 108, …), m ≤
`MAX_BLOCK`. Then H_n = H_m ⊗ H_{2ᵏ} (Sylvester), applied in O(n·(m + k)) operations: a dense
m × m product over one axis and the butterfly transform over the other. Examples: 576 = 36·16,
1536 = 12·128, 192 = 12·16, 4096 = 2¹², 11008 = 172·64 (q = 171 is not prime: unsupported;
`hadamard_size` says so), 14336 = 28·512. Any other size is refused with a clear message.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowbit.errors import LowbitError

MAX_BLOCK = 256  # the largest dense Hadamard factor m: its product costs m multiply-adds per element


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q (q, q) with Q_ij = χ(j − i), χ the quadratic character of the prime field F_q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


@functools.cache
def paley_hadamard(m: int) -> Tensor:
    """A Hadamard matrix of order m (float64) by Paley's constructions, or raises if m is not one of them.

    Paley I (q ≡ 3 mod 4, m = q + 1): H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew-symmetric.
    Paley II (q ≡ 1 mod 4, m = 2(q + 1)): S = [[0, 1ᵀ], [1, Q]] symmetric, each 0 of S replaced by
    [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]].
    """
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + S
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        S = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(S, one_block) + torch.kron((S == 0).double(), zero_block)
    raise LowbitError(f"no Paley Hadamard matrix of order {m}.")


@functools.cache
def hadamard_size(n: int) -> tuple[int, int]:
    """(m, p) with n = m·p, p a power of two and m the smallest order with a Paley matrix; raises if none."""
    if n <= 0:
        raise LowbitError(f"a Hadamard transform needs a positive size, got {n}.")
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        m = n // p
        if m <= MAX_BLOCK:
            try:
                paley_hadamard(m)
                return m, p
            except LowbitError:
                pass
        p //= 2
    raise LowbitError(f"size {n} is not m·2^k with m a Paley Hadamard order up to {MAX_BLOCK} "
                      "(1, q+1 for a prime q ≡ 3 mod 4, 2(q+1) for a prime q ≡ 1 mod 4); no Hadamard transform "
                      "of that size is built here.")


def supports(n: int) -> bool:
    """Whether `hadamard_size` has a factorisation for n."""
    try:
        hadamard_size(n)
    except LowbitError:
        return False
    return True


def fwht(x: Tensor) -> Tensor:
    """The unnormalised Walsh–Hadamard transform (Sylvester order) over the last axis, whose length is a
    power of two: log₂ n butterfly passes, O(n log n). Symmetric: its own transpose."""
    n = x.shape[-1]
    if n & (n - 1):
        raise LowbitError(f"the fast Walsh–Hadamard transform needs a power-of-two length, got {n}.")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


@functools.cache
def _paley_block(m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`paley_hadamard` on a device and in a dtype, converted once (each forward of a wrapped linear uses it);
    a normal tensor even when first asked for under inference mode, so autograd may use it later."""
    with torch.inference_mode(False):
        return paley_hadamard(m).to(device=device, dtype=dtype)


def hadamard_transform(x: Tensor, transpose: bool = False) -> Tensor:
    """x·H_nᵀ/√n over the last axis (each row vector v ↦ H_n v/√n), or x·H_n/√n with ``transpose``;
    H_n = H_m ⊗ H_p as `hadamard_size` factors n. The two are each other's inverse."""
    n = x.shape[-1]
    m, p = hadamard_size(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, m, p)
    if m > 1:
        Hm = _paley_block(m, x.device, x.dtype)
        y = torch.matmul(Hm.T if transpose else Hm, y)  # (m, m) @ (…, m, p)
    if p > 1:
        y = fwht(y)
    return y.reshape(*lead, n) * (1.0 / n**0.5)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthogonal H_n/√n (n, n) that `hadamard_transform` applies (for tests and small folds)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).T.to(dtype)


def random_signs(n: int, seed: int) -> Tensor:
    """n random ±1 (float32) from ``seed`` (torch's CPU generator, so the same on every machine)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)


def randomized_hadamard(x: Tensor, signs: Tensor) -> Tensor:
    """x·Vᵀ for V = H_n·diag(s)/√n, over the last axis: each row vector v ↦ V v."""
    return hadamard_transform(x * signs.to(device=x.device, dtype=x.dtype))


def randomized_hadamard_inverse(x: Tensor, signs: Tensor) -> Tensor:
    """x·V (each row vector v ↦ Vᵀ v), the inverse of `randomized_hadamard`."""
    return hadamard_transform(x, transpose=True) * signs.to(device=x.device, dtype=x.dtype)


def pack_signs(signs: Tensor) -> Tensor:
    """±1 (n,) → uint8 (⌈n/8⌉,), bit i of byte j set where sign 8j + i is −1 (LSB first)."""
    bits = (signs < 0).to(torch.uint8)
    n = bits.numel()
    bits = torch.nn.functional.pad(bits, (0, (-n) % 8)).reshape(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bits * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: Tensor, n: int) -> Tensor:
    """The inverse of `pack_signs`: float32 ±1 (n,)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[:, None] >> shifts) & 1
    return (1 - 2 * bits).reshape(-1)[:n].float()
