"""Stored `QuantizedWeight` → the layouts the Triton kernels read; pure torch, run once per device.

Every ``prepare_*`` returns a ``dict[str, Tensor]`` (the dispatcher's ``Prepared``) that
holds about as many bytes as the stored weight, and for 4-bit weights usually none: the
kernels read the stored nibbles in place, never expanded to floats. The kernels read
every operand through its strides (4-bit words need unit stride along K), so other
layouts run too. Shapes below use N = out features (rows of the stored weight), K = in
features, G = groups per row.

4-bit weights (int4 and NF4), the stored nibbles as N-major int32 words::

    qweight  (N, ceil(K/8)) int32   word [n, k // 8] holds code (n, k) in bits 4·(k % 8)..+4,
                                    the stored (unsigned) code: symmetric int4 is offset by 8.
                                    A view of the stored bytes, no copy, when K is a multiple
                                    of 8 and there is no act-order permutation
    scales   (G, N)                 the stored scale dtype; float32 for NF4 with
                                    double-quantised scales (decoded here, once)
    zeros    (G, N) uint8           asymmetric int4 only (one byte per zero point: the
                                    packed stored form is half that, on a tensor 1/64 the
                                    size of the codes at group 128)
    levels   (16,) float32          NF4 only: value of each code
    perm     (K,) int32             act-order only: the kernel reads columns in this
                                    order (``x[:, perm]``); groups are then contiguous
    g_idx    (K,) int32             act-order only, and only when the groups are not
                                    contiguous runs of ``group_size`` columns after
                                    ``perm``: group of each (permuted) column

Int8 weights for W8A8::

    weight   (N, K) int8            signed codes, row-major (K contiguous: the layout
                                    int8 tensor-core MMA wants for both operands)
    scale    (N,) float32           per-channel (a per-tensor scale is repeated)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import nf4_levels, pack, unpack
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

Prepared = dict[str, Tensor]
_ROW_CHUNK = 1024  # rows unpacked at a time when columns are permuted (bounds the int32 temporary)


def _reason_4bit(weight: QuantizedWeight, fmt: str) -> str | None:
    spec = weight.spec
    if spec.format != fmt or spec.bits != 4:
        return f"needs {'int4' if fmt == 'int' else fmt} weights, got {spec.describe()}"
    if spec.granularity not in ("group", "channel"):
        return f"needs per-group or per-channel scales, got per-{spec.granularity}"
    return None


def w4a16_unsupported(weight: QuantizedWeight, activations: QuantSpec | None) -> str | None:
    """None when the W4A16 kernel can run this weight, else why not."""
    if activations is not None:
        return "weight-only kernel; activations must stay in float"
    return _reason_4bit(weight, "int")


def nf4_unsupported(weight: QuantizedWeight, activations: QuantSpec | None) -> str | None:
    """None when the NF4 kernel can run this weight, else why not."""
    if activations is not None:
        return "weight-only kernel; activations must stay in float"
    return _reason_4bit(weight, "nf4")


def _reason_int8(weight: QuantizedWeight) -> str | None:
    spec = weight.spec
    if spec.format != "int" or spec.bits != 8 or not spec.symmetric:
        return f"needs symmetric int8 weights, got {spec.describe()}"
    if spec.granularity not in ("channel", "tensor"):
        return f"needs per-channel or per-tensor weight scales, got per-{spec.granularity}"
    if weight.g_idx is not None:
        return "act-order g_idx is meaningless without groups"
    return None


def w8a8_unsupported(weight: QuantizedWeight, activations: QuantSpec | None) -> str | None:
    """None when the W8A8 kernel can run this weight with these activations, else why not."""
    reason = _reason_int8(weight)
    if reason is not None:
        return reason
    if activations is None:
        return "needs dynamic int8 activations (W8A8)"
    if (activations.format, activations.bits, activations.granularity) != ("int", 8, "token"):
        return f"needs per-token int8 activations, got {activations.describe()}"
    if not activations.symmetric or activations.scale_dtype != "float32":
        return "needs symmetric activation scales kept in float32"
    return None


def _check(reason: str | None, kernel: str) -> None:
    if reason is not None:
        raise LowbitError(f"the Triton {kernel} kernel cannot run this weight: {reason}.")


def _words(weight: QuantizedWeight, perm: Tensor | None) -> Tensor:
    """(N, ceil(K·bits/8)) uint8 codes → (N, words) int32 words, columns in ``perm`` order (4-bit only).

    Without a permutation the stored bytes themselves, viewed as little-endian words (nibble i
    of word w is code 8w + i, as `pack` lays them), when each row is a whole number of words;
    otherwise a copy (rows padded to whole words, or columns permuted)."""
    rows, cols = weight.shape
    qdata = weight.qdata
    if perm is None:
        pad = (-qdata.shape[1]) % 4
        if pad == 0 and qdata.is_contiguous():
            return qdata.view(torch.int32)
        return torch.nn.functional.pad(qdata, (0, pad)).contiguous().view(torch.int32)
    chunks = []
    for start in range(0, rows, _ROW_CHUNK):
        codes = unpack(qdata[start:start + _ROW_CHUNK], 4, cols)  # (n, K) int32
        chunks.append(pack(codes[:, perm.long()], 4, torch.int32))  # (n, ceil(K/8))
    return torch.cat(chunks)


def _act_order(weight: QuantizedWeight) -> tuple[Tensor | None, Tensor | None]:
    """(perm, g_idx after perm) as int32; g_idx is None when the sorted groups are plain runs of group_size."""
    order = weight.group_order()
    if order is None:
        return None, None
    perm, groups = order
    return perm.to(torch.int32), None if groups is None else groups.to(torch.int32)


def _prepare_4bit(weight: QuantizedWeight, scales: Tensor) -> Prepared:
    perm, g_idx = _act_order(weight)
    out = {"qweight": _words(weight, perm), "scales": scales.T.contiguous()}  # (N, ceil(K/8)), (G, N)
    if perm is not None:
        out["perm"] = perm
    if g_idx is not None:
        out["g_idx"] = g_idx
    return out


def _with_zeros(weight: QuantizedWeight, out: Prepared) -> Prepared:
    zeros = weight.zero_points()  # (N, G) int32 or None
    if zeros is not None:
        out["zeros"] = zeros.T.to(torch.uint8).contiguous()  # (G, N)
    return out


def prepare_w4a16(weight: QuantizedWeight) -> Prepared:
    """int4 (sym or asym, per group or per channel, optional act-order) → ``qweight``, ``scales``
    [, ``zeros``, ``perm``, ``g_idx``]; see the module docstring."""
    _check(w4a16_unsupported(weight, None), "W4A16")
    return _with_zeros(weight, _prepare_4bit(weight, weight.scale.reshape(weight.scale_shape)))


def prepare_int(weight: QuantizedWeight) -> Prepared:
    """Integer codes of any width in stored column order (what `lowbit.kernels.cuda` reads for int3 and
    int8) → ``qweight`` (N, ceil(K·bits/32)) int32 — the stored bytes viewed as words when each row is a
    whole number of them, as `_words` gives int4 — ``scales`` (G, N) [, ``zeros`` (G, N) uint8]."""
    if weight.spec.format != "int" or weight.g_idx is not None:
        raise LowbitError(f"prepare_int takes integer codes in column order, got {weight.spec.describe()}"
                          f"{' with act-order g_idx' if weight.g_idx is not None else ''}.")
    return _with_zeros(weight, {"qweight": _words(weight, None),
                                "scales": weight.scale.reshape(weight.scale_shape).T.contiguous()})


def prepare_nf4(weight: QuantizedWeight) -> Prepared:
    """NF4 (optionally double-quantised) → ``qweight``, ``scales``, ``levels`` [, ``perm``, ``g_idx``]."""
    _check(nf4_unsupported(weight, None), "NF4")
    double = weight.scale_scale is not None
    scales = weight.scales() if double else weight.scale.reshape(weight.scale_shape)  # decoded once, float32
    out = _prepare_4bit(weight, scales)
    out["levels"] = nf4_levels().to(weight.qdata.device)
    return out


def prepare_w8a8(weight: QuantizedWeight) -> Prepared:
    """Symmetric int8 per-channel (or per-tensor) → ``weight`` (N, K) int8, ``scale`` (N,) float32."""
    _check(_reason_int8(weight), "W8A8")
    rows, cols = weight.shape
    codes = (weight.qdata.to(torch.int16) - 128).to(torch.int8)  # stored codes are offset by 128
    scale = weight.scales().reshape(-1).expand(rows).contiguous()  # (N,) float32
    return {"weight": codes.contiguous(), "scale": scale}
