"""E8P: the 2-bit, 8-dimensional lattice codebook of QuIP# (Tseng et al. 2024, arXiv 2402.04396, §4.2).

The E8 lattice is the densest packing in 8 dimensions; quantising 8 weights jointly to one of
its points wastes less than rounding each to a 1-D grid. QuIP# takes 2¹⁶ points (16 bits per 8
weights: 2 bits per weight) of the shifted lattice E8 + ¼, built so they decode from a small
table:

- the *source* set S: 256 vectors of absolute values, entries in {½, 3/2, 5/2, …}: the 227
  with squared norm ≤ 10 (all of (ℤ + ½)⁸ ∩ ℝ₊⁸ in the ball of radius √10), and 29 of the 56
  with squared norm 12 that have five entries 3/2 and three ½ (we take the first 29 in
  lexicographic order of their 2x vectors; QuIP#'s code lists its own 29, so the two codebooks
  differ in those entries);
- a codeword is ±a for a ∈ S with the signs of entries 0–6 free and the sign of entry 7 set so
  that the coordinates sum to an even integer (then ±a ∈ D8 + ½ ⊂ E8), plus a shift of +¼ or −¼
  on every entry: 8 + 7 + 1 = 16 bits.

A code is ``(source index << 8) | (sign bits of entries 0–6 << 1) | shift bit`` (sign bit 1:
negative; shift bit 1: −¼), stored as int16 (the bit pattern of the uint16). `codebook` is the
full (65536, 8) table, the reference decoder; `decode_codes` decodes from S by bit operations,
as the GPU kernel does; `nearest` finds the nearest codeword of many vectors at once.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

DIM = 8  # weights per codeword
CODE_BITS = 16
SOURCE_SIZE = 256


@functools.cache
def source_vectors_x2() -> Tensor:
    """S as integers 2a (256, 8), int64: odd positive entries; sorted by squared norm, then lexicographically."""
    small = [v for v in itertools.product((1, 3, 5), repeat=DIM) if sum(x * x for x in v) <= 40]
    norm12 = sorted(v for v in itertools.product((1, 3), repeat=DIM) if v.count(3) == 5)[:29]
    rows = sorted(small, key=lambda v: (sum(x * x for x in v), v)) + norm12
    assert len(rows) == SOURCE_SIZE
    return torch.tensor(rows, dtype=torch.int64)


def source_vectors() -> Tensor:
    """S (256, 8) float32: the absolute values a codeword is built from."""
    return source_vectors_x2().float() / 2


@functools.cache
def codebook() -> Tensor:
    """All 65536 codewords (65536, 8) float32, row c decoding code c (as uint16): the reference decoder."""
    codes = torch.arange(1 << CODE_BITS, dtype=torch.int64)
    a2 = source_vectors_x2()[codes >> 8]  # (65536, 8): 2·|codeword − shift|
    negative = torch.zeros(codes.numel(), DIM, dtype=torch.bool)
    for i in range(DIM - 1):
        negative[:, i] = ((codes >> (1 + i)) & 1).bool()
    signed = torch.where(negative, -a2, a2)
    # entry 7's sign: the sum of the coordinates (Σ signed / 2) must be even, i.e. Σ signed ≡ 0 (mod 4)
    partial = signed[:, : DIM - 1].sum(dim=1) + a2[:, DIM - 1]
    flip = (partial % 4) != 0
    signed[:, DIM - 1] = torch.where(flip, -a2[:, DIM - 1], a2[:, DIM - 1])
    shift = torch.where((codes & 1).bool(), -0.25, 0.25)[:, None]
    return signed.float() / 2 + shift


def decode_codes(codes: Tensor) -> Tensor:
    """Codewords (..., 8) float32 of int16 ``codes`` (...), by bit operations on the 256-entry table S."""
    c = codes.to(torch.int64) & 0xFFFF
    a2 = source_vectors_x2().to(c.device)[c >> 8]  # (..., 8)
    bits = (c[..., None] >> torch.arange(1, DIM, device=c.device)) & 1  # (..., 7)
    signs = torch.cat([1 - 2 * bits, torch.ones_like(bits[..., :1])], dim=-1)
    signed = a2 * signs
    parity = signed.sum(dim=-1) % 4  # Σ with entry 7 positive
    signed[..., DIM - 1] = torch.where(parity != 0, -signed[..., DIM - 1], signed[..., DIM - 1])
    shift = torch.where((c & 1).bool(), -0.25, 0.25)[..., None]
    return signed.float() / 2 + shift


def nearest(v: Tensor, chunk: int = 8192, candidates: int = 16) -> tuple[Tensor, Tensor]:
    """The nearest codeword (Euclidean) to each row of v (N, 8): (codes (N,) int16, codewords (N, 8) float32).

    For a shift t and source vector a, the best signs are those of u = v − t (gain Σ aᵢ|uᵢ|), unless
    their sum is odd, when the entry with the smallest aᵢ|uᵢ| must flip (gain − 2·min aᵢ|uᵢ|); the
    distance is ‖u‖² + ‖a‖² − 2·gain. The gains of all 256 a come from one matrix product; the flip
    penalty, which only raises a distance, is computed for the ``candidates`` a closest before it. That
    misses the exact nearest only when more than ``candidates`` source vectors lie closer than it
    before their penalty (a test checks against all 65536 codewords).
    """
    v = v.float()
    A2 = source_vectors_x2().to(v.device).float()  # (256, 8): 2a, exact in float32
    A = A2 / 2
    norms = (A * A).sum(dim=1)  # (256,)
    codes_out = torch.empty(v.shape[0], dtype=torch.int64, device=v.device)
    k = min(candidates, SOURCE_SIZE)
    powers = 1 << torch.arange(1, DIM, device=v.device)
    for s in range(0, v.shape[0], chunk):
        block = v[s : s + chunk]
        n = block.shape[0]
        rows = torch.arange(n, device=v.device)
        best_dist = best_code = None
        for shift_bit, t in ((0, 0.25), (1, -0.25)):
            u = block - t
            y = u.abs()
            neg = u < 0  # (n, 8)
            bound = norms[None] - 2 * (y @ A.T)  # (n, 256): ‖a‖² − 2·gain before any flip
            top = bound.topk(k, dim=1, largest=False).indices  # (n, k)
            terms = y[:, None, :] * A[top]  # (n, k, 8): aᵢ|uᵢ|
            signed_sum = (torch.where(neg, -1.0, 1.0)[:, None, :] * A2[top]).sum(dim=-1)  # Σ sᵢ·2aᵢ, exact
            odd = torch.remainder(signed_sum, 4) != 0
            least, where = terms.min(dim=-1)
            dist = bound.gather(1, top) + torch.where(odd, 4 * least, torch.zeros_like(least))
            d, pick = dist.min(dim=1)
            d = d + (u * u).sum(dim=1)  # ‖u‖² differs between the two shifts
            j = top.gather(1, pick[:, None])[:, 0]
            # the codeword's signs: u's, with entry `where` flipped when the sum was odd
            flip = odd.gather(1, pick[:, None])[:, 0]
            flip_at = where.gather(1, pick[:, None])[:, 0]
            chosen_neg = neg.clone()
            chosen_neg[rows[flip], flip_at[flip]] = ~chosen_neg[rows[flip], flip_at[flip]]
            sign_bits = (chosen_neg[:, : DIM - 1].to(torch.int64) * powers).sum(dim=1)
            code = (j << 8) | sign_bits | shift_bit
            if best_dist is None:
                best_dist, best_code = d, code
            else:
                better = d < best_dist
                best_dist = torch.where(better, d, best_dist)
                best_code = torch.where(better, code, best_code)
        codes_out[s : s + chunk] = best_code
    codes16 = to_int16(codes_out)
    return codes16, decode_codes(codes16)


def to_int16(codes: Tensor) -> Tensor:
    """Codes 0…65535 (any int dtype) as int16 bit patterns."""
    c = codes.to(torch.int64) & 0xFFFF
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)
