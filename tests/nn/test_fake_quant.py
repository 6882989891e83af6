"""FakeQuantLinear: the forward pass decodes exactly what the codec would, the packed conversion decodes to the
same weight bit for bit, and the straight-through / LSQ gradients match their definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import dispatch
from lowbit.nn import ActivationFakeQuant, FakeQuantLinear, QuantLinear
from lowbit.nn.fake_quant import _AffineFakeQuant, fake_quantize_weight, round_ste
from lowbit.scheme import FP8, W8A8, W8A8_STATIC, QuantSpec
from lowbit.tensor import fake_quantize, fake_quantize_static, quantize_weight

SPECS = [
    QuantSpec("int", 3, "group", 128, symmetric=False),
    QuantSpec("int", 2, "group", 64, symmetric=False),
    QuantSpec("int", 4, "group", 128),
    QuantSpec("int", 8, "channel"),
    QuantSpec("int", 5, "tensor", symmetric=False),
    QuantSpec("int", 4, "group", 16, observer="mse"),
    QuantSpec("nf4", 4, "group", 64),
    QuantSpec("nf4", 4, "group", 64, double_quant=True),
    QuantSpec("fp4", 4, "group", 32),
    QuantSpec("fp8_e4m3", 8, "channel", scale_dtype="float32"),
    QuantSpec("fp8_e5m2", 8, "group", 64),
    QuantSpec("int", 4, "group", 32, scale_dtype="bfloat16"),
]


def _perturb(module: FakeQuantLinear, generator: torch.Generator) -> None:
    with torch.no_grad():
        module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.05)
        module.scale.mul_(1 + 0.2 * torch.rand(module.scale.shape, generator=generator))
        if module.zero_point is not None:
            module.zero_point.add_(torch.rand(module.zero_point.shape, generator=generator) - 0.5)


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(SPECS), rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_rtn_start_and_conversion_are_exact(spec, rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, cols, generator=generator) * 0.1)
    module = FakeQuantLinear.from_linear(linear, spec)
    # at initialisation the fake-quant weight is RTN's decode, exactly
    assert torch.equal(module.fake_weight(), quantize_weight(linear.weight, spec).dequantize())
    _perturb(module, generator)
    packed = module.to_quant_linear()
    assert isinstance(packed, QuantLinear)
    assert torch.equal(packed.weight.dequantize(), module.fake_weight())
    # and a module rebuilt from the packed layer starts where this one is
    again = FakeQuantLinear.from_quant_linear(packed)
    if not spec.double_quant:
        assert torch.equal(again.fake_weight(), module.fake_weight())


def test_act_order_groups_round_trip():
    generator = torch.Generator().manual_seed(0)
    spec = QuantSpec("int", 4, "group", 16, symmetric=False)
    w = torch.randn(8, 70, generator=generator)
    g_idx = torch.randperm(70, generator=generator) // 16  # groups not contiguous, as GPTQ act-order makes them
    scale = torch.rand(8, 5, generator=generator) * 0.2 + 0.1
    zero = torch.randint(0, 16, (8, 5), generator=generator).float()
    module = FakeQuantLinear(w, None, spec, scale, zero, g_idx=g_idx)
    packed = module.to_quant_linear()
    assert packed.weight.g_idx is not None
    assert torch.equal(packed.weight.dequantize(), module.fake_weight())


@pytest.mark.parametrize("zero_point", [True, False])
def test_fused_int_node_matches_autograd_composition(zero_point):
    """The one-node forward/backward equals the chain round_ste → +z → clamp → −z → ·s differentiated by autograd."""
    generator = torch.Generator().manual_seed(1)
    lo, hi = (0.0, 7.0) if zero_point else (-4.0, 3.0)
    x = (torch.randn(5, 3, 16, generator=generator) * 0.6).requires_grad_()
    s = (torch.rand(5, 3, 1, generator=generator) * 0.1 + 0.05).requires_grad_()
    z = (torch.randint(0, 8, (5, 3, 1), generator=generator).float() + 0.2).requires_grad_() if zero_point else None
    g = torch.randn(5, 3, 16, generator=generator)

    def composed():
        zr = round_ste(z).clamp(lo, hi) if zero_point else None
        q = round_ste(x / s)
        q = (q + zr if zero_point else q).clamp(lo, hi)
        return (q - zr if zero_point else q) * s

    ref = composed()
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, s] + ([z] if zero_point else []))
    out, codes = _AffineFakeQuant.apply(x, s, round_ste(z).clamp(lo, hi) if zero_point else None, lo, hi)
    grads = torch.autograd.grad((out * g).sum(), [x, s] + ([z] if zero_point else []))
    assert torch.equal(out, ref)
    assert codes.min() >= lo and codes.max() <= hi
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # LSQ: clipped elements pass no gradient to x, and the scale gets one
    assert (grads[0] == 0).any() and grads[1].abs().sum() > 0


def test_gradients_reach_weights_and_scales_of_every_format():
    x = torch.randn(4, 96)
    for spec in SPECS:
        linear = torch.nn.Linear(96, 20)
        module = FakeQuantLinear.from_linear(linear, spec)
        module(x).square().sum().backward()
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, spec
        assert module.scale.grad is not None and torch.isfinite(module.scale.grad).all(), spec
        assert module.scale.grad.abs().sum() > 0, spec


def test_frozen_scales_are_buffers():
    module = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), SPECS[0], learn_scale=False, learn_zero_point=False)
    names = {n for n, _ in module.named_parameters()}
    assert names == {"weight", "bias"} and not module.bias.requires_grad
    assert {"scale", "zero_point"} <= {n for n, _ in module.named_buffers()}


@pytest.mark.parametrize("scheme", [W8A8, FP8])
def test_dynamic_activations_match_the_kernels_fake_quant(scheme):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 64, generator=generator, requires_grad=True)
    act = ActivationFakeQuant(scheme.activations)
    y = act(x)
    assert torch.equal(y, fake_quantize(x.detach(), scheme.activations))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
    linear = torch.nn.Linear(64, 24)
    module = FakeQuantLinear.from_linear(linear, scheme.weights, scheme.activations)
    packed = module.to_quant_linear()
    torch.testing.assert_close(packed(x.detach()), module(x.detach()), rtol=1e-4, atol=1e-4)


def test_static_activation_scale_is_learned_and_carried_over():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=generator)
    linear = torch.nn.Linear(64, 24)
    module = FakeQuantLinear.from_linear(linear, W8A8_STATIC.weights, W8A8_STATIC.activations)
    y = module(x)  # the first batch sets the scale from its absmax
    s = module.act_quant.scale
    assert s.item() == pytest.approx(x.abs().max().item() / 127, rel=1e-6)
    y.square().sum().backward()
    assert s.grad is not None and s.grad.abs().item() > 0
    assert torch.equal(module.act_quant(x), fake_quantize_static(x, W8A8_STATIC.activations, s.detach()))
    packed = module.to_quant_linear()
    assert torch.equal(packed.input_scale, s.detach())
    torch.testing.assert_close(packed(x), module(x), rtol=1e-4, atol=1e-4)


def test_converted_int4_runs_on_a_fast_kernel():
    linear = torch.nn.Linear(576, 64)
    spec = QuantSpec("int", 4, "group", 128)
    module = FakeQuantLinear.from_linear(linear, spec)
    packed = module.to_quant_linear()
    for m in (1, 64):
        assert dispatch.choose(packed.weight, None, torch.device("cpu"), m) is not dispatch.REFERENCE
    x = torch.randn(5, 576)
    torch.testing.assert_close(packed(x), module(x), rtol=1e-4, atol=1e-4)


def test_learned_scale_that_goes_negative_stays_decodable():
    spec = QuantSpec("int", 3, "group", 32, symmetric=False)
    module = FakeQuantLinear.from_linear(torch.nn.Linear(64, 4), spec)
    with torch.no_grad():
        module.scale[0, 0] = -1.0
    w = fake_quantize_weight(module.weight, module.scale, module.zero_point, spec)
    assert torch.isfinite(w).all()
    assert torch.equal(module.to_quant_linear().weight.dequantize(), module.fake_weight())
