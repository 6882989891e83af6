"""GGML block formats as GGUF files store them: Q8_0, Q4_0, Q4_1, Q6_K and Q4_K.

The formats are defined by llama.cpp (``ggml/src/ggml-common.h`` for the block structs,
``ggml-quants.c`` for the reference codecs) and mirrored by the ``gguf`` package's
``quants.py``; this is our own implementation written from those layouts, in torch.
Each row of a (R, C) weight is cut into blocks along C; a block is a fixed number of
bytes, every multi-byte field a little-endian float16.

======  =====  =====  =========================================================================
type    block  bytes  layout; the value element i of a block decodes to
======  =====  =====  =========================================================================
Q8_0    32     34     d:f16, q[32]:int8;                                     x = d·q
Q4_0    32     18     d:f16, qs[16]: byte j = q_j | q_{j+16} << 4, q 0..15;  x = d·(q − 8)
Q4_1    32     20     d:f16, m:f16, qs[16] as in Q4_0;                       x = d·q + m
Q6_K    256    210    ql[128], qh[64], sc[16]:int8, d:f16; 16 sub-blocks of 16, q 0..63:
                      x = (d·sc_s)·(q − 32); see `_q6k_pack` for where the bits go
Q4_K    256    144    d:f16, dmin:f16, 12 bytes of eight 6-bit (sc_s, m_s), qs[128]; 8 sub-blocks
                      of 32, q 0..15: x = (d·sc_s)·q − dmin·m_s; see `_q4k_pack_scales`
======  =====  =====  =========================================================================

Decoding multiplies in the order llama.cpp and ``gguf.quants`` do (the sub-block scale
``d·sc`` first), so our floats equal theirs bit for bit. The encoders are plain
round-to-nearest with the format's own conventions (Q4_0 / Q6_K map the value of
largest magnitude to the most negative code, as llama.cpp does, so the sign of the
scale carries that value's sign); they are not llama.cpp's iterative searches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError

# type name → (elements per block, bytes per block)
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q6_K": (256, 210),
    "Q4_K": (256, 144),
}
_F16_MAX = float(torch.finfo(torch.float16).max)


def _f16(x: Tensor, what: str) -> Tensor:
    """``x`` rounded to float16, refused when a value overflows it."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        big = float(x.abs().max())
        raise LowbitError(f"{what}: a block scale of {big:.3g} does not fit the format's float16 (max {_F16_MAX:g}).")
    return h


def _f16_outward(x: Tensor, what: str) -> Tensor:
    """``x`` in float16 rounded away from zero, so that a super-block scale derived from the largest
    sub-block scale never leaves that one out of its code range (it matters when the scale is a float16
    subnormal, which is common: Q6_K's d is a block's largest value / 4096)."""
    h = _f16(x, what)
    short = h.float().abs() < x.abs()
    away = torch.where(x > 0, torch.tensor(float("inf")), torch.tensor(float("-inf"))).to(torch.float16)
    return torch.where(short, torch.nextafter(h, away), h)


def _f16_bytes(h: Tensor) -> Tensor:
    """(N,) float16 → (N, 2) uint8, little-endian."""
    return h.reshape(-1, 1).contiguous().view(torch.uint8)


def _read_f16(blocks: Tensor, at: int) -> Tensor:
    """The float16 at byte ``at`` of every block, as (N, 1) float32."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(q: Tensor) -> Tensor:
    """(N, 32) codes 0..15 → (N, 16) bytes: q_j in the low nibble, q_{j+16} in the high one."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _unnibble(qs: Tensor) -> Tensor:
    """(N, 16) bytes → (N, 32) codes, the inverse of `_nibbles`."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _blocks(w: Tensor, kind: str, what: str) -> Tensor:
    """(R, C) float → (R·C/block, block) float32, after checking C and finiteness."""
    block = GGML_BLOCKS[kind][0]
    if w.dim() != 2 or w.shape[1] % block:
        raise LowbitError(f"{what}: GGUF {kind} needs rows of a multiple of {block} values, got shape "
                          f"{tuple(w.shape)}.")
    if not torch.isfinite(w).all():
        raise LowbitError(f"{what} contains NaN or Inf values; GGUF {kind} cannot encode them.")
    return w.detach().float().reshape(-1, block)


def _safe_div(x: Tensor, d: Tensor) -> Tensor:
    """x / d with 0 where d is 0 (an all-zero block, or a scale below float16's range)."""
    return torch.where(d == 0, torch.zeros_like(x), x / torch.where(d == 0, torch.ones_like(d), d))


def _signed_absmax(x: Tensor) -> Tensor:
    """The value of largest magnitude along the last dim, with its sign, keepdim."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


# -- the 32-element types: lossless constructors from codes and scales ------------------------------

def q8_0_from_codes(codes: Tensor, d: Tensor) -> Tensor:
    """Q8_0 bytes (R, C/32·34) from signed codes (R, C) in −128..127 and float16 scales (R, C/32)."""
    q = codes.to(torch.int8).reshape(-1, 32).view(torch.uint8)
    out = torch.cat([_f16_bytes(d.to(torch.float16)), q], dim=1)
    return out.reshape(codes.shape[0], -1)


def q4_0_from_codes(codes: Tensor, d: Tensor) -> Tensor:
    """Q4_0 bytes from codes (R, C) in 0..15 (the value is d·(q − 8)) and float16 scales (R, C/32)."""
    out = torch.cat([_f16_bytes(d.to(torch.float16)), _nibbles(codes.reshape(-1, 32))], dim=1)
    return out.reshape(codes.shape[0], -1)


def q4_1_from_codes(codes: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Q4_1 bytes from codes (R, C) in 0..15 (the value is d·q + m) and float16 d, m (R, C/32)."""
    out = torch.cat([_f16_bytes(d.to(torch.float16)), _f16_bytes(m.to(torch.float16)),
                     _nibbles(codes.reshape(-1, 32))], dim=1)
    return out.reshape(codes.shape[0], -1)


def _encode_q8_0(x: Tensor, what: str) -> Tensor:
    d = _f16(x.abs().amax(dim=1, keepdim=True) / 127, what)
    return q8_0_from_codes(_safe_div(x, d.float()).round().clamp(-128, 127), d)


def _encode_q4_0(x: Tensor, what: str) -> Tensor:
    d = _f16(_signed_absmax(x) / -8, what)
    return q4_0_from_codes((_safe_div(x, d.float()).round() + 8).clamp(0, 15), d)


def _encode_q4_1(x: Tensor, what: str) -> Tensor:
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d, m = _f16((hi - lo) / 15, what), _f16(lo, what)
    return q4_1_from_codes(_safe_div(x - m.float(), d.float()).round().clamp(0, 15), d, m)


def _decode_q8_0(b: Tensor) -> Tensor:
    return _read_f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _decode_q4_0(b: Tensor) -> Tensor:
    return _read_f16(b, 0) * (_unnibble(b[:, 2:]).float() - 8)


def _decode_q4_1(b: Tensor) -> Tensor:
    return _read_f16(b, 0) * _unnibble(b[:, 4:]).float() + _read_f16(b, 2)


# -- Q6_K ----------------------------------------------------------------------------------------

def _q6k_pack(q: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 256) codes 0..63 → ql (N, 128), qh (N, 64).

    Each half h of 128 elements owns ql[64h : 64h+64] and qh[32h : 32h+32]; for l < 32,
    elements l, l+32, l+64, l+96 of the half keep their low 4 bits in the low nibble of
    ql[l], the low nibble of ql[l+32], the high nibble of ql[l], the high nibble of
    ql[l+32], and their high 2 bits in bits 0-1, 2-3, 4-5, 6-7 of qh[l].
    """
    q = q.to(torch.uint8).reshape(-1, 2, 4, 32)  # (N, half, quarter, l)
    low, high = q & 15, q >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)  # (N, 2, 64)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # (N, 2, 32)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _q6k_unpack(ql: Tensor, qh: Tensor) -> Tensor:
    ql, qh = ql.reshape(-1, 2, 2, 32), qh.reshape(-1, 2, 1, 32)  # (N, half, ql[l] / ql[l+32], l)
    low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    return (low | (high << 4)).reshape(-1, 256)


def _encode_q6_k(x: Tensor, what: str) -> Tensor:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    s = _signed_absmax(sub).squeeze(-1) / -32  # (N, 16): the largest magnitude → code −32
    d = _f16_outward(_signed_absmax(s) / -128, what)  # (N, 1)
    sc = _safe_div(s, d.float()).round().clamp(-128, 127)
    step = (d.float() * sc).unsqueeze(-1)  # (N, 16, 1)
    q = (_safe_div(sub, step).round().clamp(-32, 31) + 32).reshape(n, 256)
    ql, qh = _q6k_pack(q)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)


def _decode_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    q = _q6k_unpack(b[:, :128], b[:, 128:192]).float().reshape(n, 16, 16) - 32
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    step = (_read_f16(b, 208) * sc).unsqueeze(-1)
    return (step * q).reshape(n, 256)


# -- Q4_K ----------------------------------------------------------------------------------------

def _q4k_pack_scales(sc: Tensor, m: Tensor) -> Tensor:
    """Eight 6-bit scales and mins (N, 8) each → (N, 12) bytes.

    Bytes 0-3 hold sc_0..3 in their low 6 bits, bytes 4-7 m_0..3; sub-blocks 4..7 keep
    their low 4 bits in bytes 8-11 (sc low nibble, m high nibble) and their top 2 bits in
    the top 2 bits of bytes 0-3 (sc) and 4-7 (m).
    """
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    head = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6)], dim=1)
    return torch.cat([head, (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], dim=1)


def _q4k_unpack_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    lo_sc, lo_m, tail = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([lo_sc & 63, (tail & 15) | ((lo_sc >> 6) << 4)], dim=1)
    m = torch.cat([lo_m & 63, (tail >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return sc, m


def _encode_q4_k(x: Tensor, what: str) -> Tensor:
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = sub.amin(dim=-1).clamp(max=0)  # the format subtracts a non-negative offset: min ≤ 0
    hi = sub.amax(dim=-1).clamp(min=0)
    s, off = (hi - lo) / 15, -lo  # (N, 8) each
    d = _f16_outward(s.amax(dim=1, keepdim=True) / 63, what)
    dmin = _f16_outward(off.amax(dim=1, keepdim=True) / 63, what)
    sc = _safe_div(s, d.float()).round().clamp(0, 63)
    m = _safe_div(off, dmin.float()).round().clamp(0, 63)
    step = (d.float() * sc).unsqueeze(-1)  # (N, 8, 1)
    shift = (dmin.float() * m).unsqueeze(-1)
    q = _safe_div(sub + shift, step).round().clamp(0, 15).to(torch.uint8)  # (N, 8, 32)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # 32-byte chunk c: sub-blocks 2c (low), 2c+1 (high)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _q4k_pack_scales(sc, m), qs], dim=1)


def _decode_q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, m = _q4k_unpack_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, 8, 32).float()
    step = (_read_f16(b, 0) * sc.float()).unsqueeze(-1)
    shift = (_read_f16(b, 2) * m.float()).unsqueeze(-1)
    return (step * q - shift).reshape(n, 256)


_ENCODERS = {"Q8_0": _encode_q8_0, "Q4_0": _encode_q4_0, "Q4_1": _encode_q4_1, "Q6_K": _encode_q6_k,
             "Q4_K": _encode_q4_k}
_DECODERS = {"Q8_0": _decode_q8_0, "Q4_0": _decode_q4_0, "Q4_1": _decode_q4_1, "Q6_K": _decode_q6_k,
             "Q4_K": _decode_q4_k}


def _check_kind(kind: str) -> None:
    if kind not in GGML_BLOCKS:
        raise LowbitError(f"GGML type {kind!r} is not one of {', '.join(GGML_BLOCKS)}.")


def ggml_encode(w: Tensor, kind: str, what: str = "weight") -> Tensor:
    """(R, C) float weight → (R, C/block·bytes) uint8 blocks of GGML type ``kind``."""
    _check_kind(kind)
    rows = w.shape[0] if w.dim() == 2 else 0
    blocks = _ENCODERS[kind](_blocks(w, kind, what), what)
    return blocks.reshape(rows, -1).contiguous()


def ggml_decode(data: Tensor, kind: str) -> Tensor:
    """(R, n_bytes) uint8 blocks of GGML type ``kind`` → (R, C) float32."""
    _check_kind(kind)
    size = GGML_BLOCKS[kind][1]
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % size:
        raise LowbitError(f"GGUF {kind} data must be (rows, a multiple of {size}) uint8, got {data.dtype} "
                          f"{tuple(data.shape)}.")
    rows = data.shape[0]
    return _DECODERS[kind](data.reshape(-1, size)).reshape(rows, -1)
