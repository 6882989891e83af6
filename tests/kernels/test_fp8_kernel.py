"""The FP8 kernel's host side: per-token e4m3 activations equal the reference's, the weight is a
view of the stored bytes, and it declines what it cannot run. (``torch._scaled_mm`` itself needs
an FP8-capable GPU; bench/gpu_kernels.py checks its products against the reference there.)"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels.gpu import fp8_unsupported, prepare_fp8, quantize_tokens_fp8
from lowbit.scheme import QuantSpec, get_scheme
from lowbit.tensor import fake_quantize, quantize_weight

FP8 = get_scheme("FP8")


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]), zero_row=st.booleans())
def test_token_fp8_codes_equal_the_reference_fake_quantisation(m, k, seed, scale, zero_row):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale
    if zero_row:
        x[0] = 0.0
    codes, s = quantize_tokens_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and s.shape == (m, 1) and bool((s > 0).all())
    assert torch.equal(codes.float() * s, fake_quantize(x, FP8.activations))


def test_prepared_fp8_weight_is_a_view_of_the_stored_bytes():
    w = quantize_weight(torch.randn(48, 32), FP8.weights)
    p = prepare_fp8(w)
    assert p["weight"].dtype == torch.float8_e4m3fn and p["weight"].shape == (48, 32)
    assert p["weight"].untyped_storage().data_ptr() == w.qdata.untyped_storage().data_ptr()
    assert p["scale"].shape == (1, 48)
    assert torch.equal(p["weight"].float() * p["scale"].T, w.dequantize())


def test_fp8_kernel_declines_what_it_cannot_run():
    w = quantize_weight(torch.randn(48, 32), FP8.weights)
    cpu = torch.device("cpu")
    assert "compute capability" in fp8_unsupported(w, FP8.activations, cpu)
    assert "per-token e4m3" in fp8_unsupported(w, None, cpu)
    int8 = quantize_weight(torch.randn(48, 32), QuantSpec("int", 8, "channel"))
    assert "e4m3 weights" in fp8_unsupported(int8, FP8.activations, cpu)
