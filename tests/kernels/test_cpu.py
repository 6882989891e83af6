"""The packed-integer CPU kernel against the reference, on awkward shapes, and its dispatch."""

import pytest
import torch

from lowbit.kernels import dispatch, quantized_linear
from lowbit.kernels.cpu import INT_GEMV, MAX_M, extension
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec
from lowbit.tensor import quantize_weight

pytestmark = pytest.mark.skipif(isinstance(extension(), str), reason="the C++ kernels cannot be built here")

CASES = [  # (spec, N, K): ragged last groups where the group does not divide K
    (QuantSpec("int", 4, "group", 128), 72, 576),
    (QuantSpec("int", 4, "group", 64, symmetric=False), 40, 160),
    (QuantSpec("int", 4, "group", 32, symmetric=False, scale_dtype="bfloat16"), 40, 100),
    (QuantSpec("int", 8, "channel"), 72, 96),
    (QuantSpec("int", 8, "group", 64, symmetric=False), 40, 150),
    (QuantSpec("int", 2, "group", 64, symmetric=False), 40, 162),
    (QuantSpec("int", 4, "channel", scale_dtype="float32"), 24, 34),
]


@pytest.mark.parametrize("spec,N,K", CASES, ids=lambda c: c.describe() if isinstance(c, QuantSpec) else str(c))
@pytest.mark.parametrize("M", [1, 7, 16])
def test_kernel_matches_the_reference(spec, N, K, M):
    gen = torch.Generator().manual_seed(N * K + M)
    weight = quantize_weight(torch.randn(N, K, generator=gen), spec)
    assert INT_GEMV.supports(weight, None, torch.device("cpu")) is None
    x, bias = torch.randn(M, K, generator=gen), torch.randn(N, generator=gen)
    y = INT_GEMV.run(x, {}, weight, bias, None)
    ref = quantized_linear(x, weight, bias)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_custom_op_passes_opcheck():
    weight = quantize_weight(torch.randn(40, 160), QuantSpec("int", 4, "group", 64, symmetric=False))
    args = (torch.randn(3, 160), weight.qdata, weight.scale, weight.zero_point, 4, 64, 40)
    torch.library.opcheck(torch.ops.lowbit.int_gemv_cpu.default, args)


def test_quant_linear_uses_it_for_decode_and_the_reference_for_prefill(monkeypatch):
    layer = QuantLinear(quantize_weight(torch.randn(72, 576), QuantSpec("int", 4, "group", 128)))
    assert dispatch.choose(layer.weight, None, torch.device("cpu"), 1) is INT_GEMV
    assert dispatch.choose(layer.weight, None, torch.device("cpu"), MAX_M + 1) is dispatch.REFERENCE
    calls = []
    original = INT_GEMV.run
    monkeypatch.setattr(dispatch, "_KERNELS", [dispatch.Kernel(INT_GEMV.name, "cpu", INT_GEMV.supports, INT_GEMV.prepare,
                                                               lambda *a: calls.append(1) or original(*a),
                                                               max_m=MAX_M)])
    x = torch.randn(2, 3, 576)  # leading dimensions are tokens too
    torch.testing.assert_close(layer(x), quantized_linear(x, layer.weight), rtol=1e-5, atol=1e-4)
    assert calls == [1]


@pytest.mark.parametrize("spec", [QuantSpec("nf4", 4, "group", 64), QuantSpec("int", 3, "group", 128),
                                  QuantSpec("fp8_e4m3", 8, "channel")], ids=lambda s: s.describe())
def test_formats_it_cannot_run_are_refused_with_a_reason(spec):
    weight = quantize_weight(torch.randn(24, 256), spec)
    assert "integer 2/4/8-bit" in INT_GEMV.supports(weight, None, torch.device("cpu"))
