"""GPU kernels registered with the dispatcher: the Triton ones (`lowbit.kernels.triton`).

They run only on CUDA devices and only when Triton imports; everything else falls back
to the reference. Their speed has not yet been measured on a GPU (bench/gpu_kernels.py
is the script that will), so they are registered for every M.
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton as tk
from lowbit.kernels.dispatch import Kernel, register


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
