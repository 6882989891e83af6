"""GPU kernels registered with the dispatcher: the Triton ones (`lowbit.kernels.triton`), FP8
through ``torch._scaled_mm``, and int3 / int8 weight-only through the CUDA C++ kernel of `lowbit.kernels.cuda`
(opt-in with LOWBIT_CUDA_KERNELS=1 until it has run on a GPU; the same switch lets the int4 launcher
pick it at ≤ 32 tokens).

They run only on CUDA devices (the Triton ones only when Triton imports); everything else
falls back to the reference. Block configs and the M at which 4-bit weights switch from
the fused kernels to dequantise + cuBLAS come from ``bench/gpu_kernels.py`` on an H100
(see `lowbit.kernels.triton.ops` and bench/results/gpu_kernels_notes.md). Measured there
(2026-11-27) on the 70B shapes, int4 g128 is 1.8–1.9× bf16 at one token, 1.2–1.7× at 16,
0.82–0.88× at 2048; W8A8 1.3–1.6× at 2048 — short of this project's goals.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import cuda as ck
from lowbit.kernels import triton as tk
from lowbit.kernels.dispatch import Kernel, Prepared, register
from lowbit.kernels.triton.layout import prepare_int
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

E4M3_MAX = 448.0


def _supports(unsupported):
    def check(weight, activations, device: torch.device) -> str | None:
        if not tk.available():
            return "Triton is not installed"
        return unsupported(weight, activations)

    return check


register(Kernel("triton-w4a16", "cuda", _supports(tk.w4a16_unsupported), tk.prepare_w4a16,
                lambda x, p, w, b, a: tk.w4a16_linear(x, p, w.group_size, b)))
register(Kernel("triton-nf4", "cuda", _supports(tk.nf4_unsupported), tk.prepare_nf4,
                lambda x, p, w, b, a: tk.nf4_linear(x, p, w.group_size, b)))
register(Kernel("triton-w8a8", "cuda", _supports(tk.w8a8_unsupported), tk.prepare_w8a8,
                lambda x, p, w, b, a: tk.w8a8_linear(x, p, b)))
# int3 / int8 weight-only: the tensor-core kernel up to 32 tokens, one-pass dequantise + cuBLAS above; opt-in,
# see lowbit.kernels.cuda
register(Kernel("cuda-int-a16", "cuda", ck.weight_only_unsupported, prepare_int,
                lambda x, p, w, b, a: ck.weight_only_linear(x, p, w, b)))


# -- FP8: e4m3 weights per channel × e4m3 activations per token, on the FP8 tensor cores --------

def fp8_unsupported(weight: QuantizedWeight, activations: QuantSpec | None, device: torch.device) -> str | None:
    """None when `fp8_linear` can run this weight on this device, else why not."""
    spec = weight.spec
    if spec.format != "fp8_e4m3" or spec.granularity not in ("channel", "tensor"):
        return f"needs e4m3 weights with per-channel or per-tensor scales, got {spec.describe()}"
    if activations is None or (activations.format, activations.granularity) != ("fp8_e4m3", "token"):
        return "needs dynamic per-token e4m3 activations"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 matrix products need a CUDA device of compute capability 8.9 or newer"
    rows, cols = weight.shape
    if rows % 16 or cols % 16:
        return f"torch._scaled_mm needs in and out features that are multiples of 16, got {cols} and {rows}"
    return None


def prepare_fp8(weight: QuantizedWeight) -> Prepared:
    """``weight`` (N, K) float8_e4m3fn — a view of the stored bytes, no copy — and ``scale`` (1, N) float32."""
    rows = weight.shape[0]
    scale = weight.scales().reshape(-1).float().expand(rows).reshape(1, rows).contiguous()
    return {"weight": weight.qdata.view(torch.float8_e4m3fn), "scale": scale}


def quantize_tokens_fp8(x2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token e4m3 of x (M, K): codes (M, K) float8_e4m3fn and scales (M, 1) float32 = absmax / 448
    (the smallest normal float32 for an all-zero row), as `lowbit.tensor.fake_quantize` does."""
    amax = x2.abs().amax(dim=1, keepdim=True).float()
    scale = amax / E4M3_MAX
    scale = torch.where(scale == 0, torch.finfo(torch.float32).smallest_normal, scale)
    codes = (x2.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_linear(x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor:
    """q(x) @ W (N, K) e4m3ᵀ · token scale · channel scale (+ bias), one ``torch._scaled_mm``
    (cuBLASLt, row-wise scaling, bfloat16 output), in x's dtype."""
    w = prepared["weight"]
    x2 = x.reshape(-1, x.shape[-1])
    codes, scale = quantize_tokens_fp8(x2)
    y = torch._scaled_mm(codes, w.T, scale_a=scale, scale_b=prepared["scale"], out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


register(Kernel("torch-fp8", "cuda", fp8_unsupported, prepare_fp8, lambda x, p, w, b, a: fp8_linear(x, p, b)))
