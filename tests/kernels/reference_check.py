"""The comparison every GPU-kernel test makes against `lowbit.kernels.reference` (imported by the
test modules beside it)."""

import torch

# A few roundings of the output dtype.
TOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` matches the reference ``ref`` elementwise, |out − ref| ≤ tol · (|ref| + rms(ref)) with tol a
    few roundings of ref's dtype, and is all written (the tests poison outputs with NaN first)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "the kernel left outputs unwritten (NaN)"
    tol = TOL[ref.dtype]
    out, ref = out.double().cpu(), ref.double().cpu()
    bound = tol * (ref.abs() + ref.pow(2).mean().sqrt())
    worst = ((out - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"error up to {worst:.2f}× the tolerance"
