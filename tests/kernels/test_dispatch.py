"""The reference custom op, the dispatcher's fallback, and QuantLinear's input checks."""

import logging
import os
import shutil

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch, quantized_linear
from lowbit.kernels.ops import reference_op, spec_to_json
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec, get_scheme
from lowbit.tensor import quantize_weight

SPECS = [QuantSpec("int", 4, "group", 64), QuantSpec("int", 3, "group", 128, symmetric=False),
         QuantSpec("nf4", 4, "group", 64), QuantSpec("int", 8, "channel"), QuantSpec("fp8_e4m3", 8, "channel")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_reference_op_passes_opcheck_and_equals_the_python_reference(spec):
    gen = torch.Generator().manual_seed(0)
    w = quantize_weight(torch.randn(40, 160, generator=gen), spec)
    x, bias = torch.randn(7, 160, generator=gen), torch.randn(40, generator=gen)
    act = get_scheme("W8A8").activations if spec.format == "int" and spec.bits == 8 else None
    args = (x, w.qdata, w.scale, w.zero_point, w.scale_scale, w.scale_offset, w.g_idx, bias, 40, 160,
            spec_to_json(spec), spec_to_json(act))
    torch.library.opcheck(torch.ops.lowbit.dequant_linear.default, args)
    assert torch.equal(reference_op(x, w, bias, act), quantized_linear(x, w, bias, act))
    with torch.device("meta"):  # the fake implementation gives shape and dtype only
        out = torch.ops.lowbit.dequant_linear(torch.empty(3, 5, 160), *[a.to("meta") if isinstance(a, torch.Tensor)
                                                                       else a for a in args[1:]])
    assert out.shape == (3, 5, 40) and out.device.type == "meta"


def test_a_format_without_a_fast_kernel_runs_on_the_reference_with_one_warning(caplog, monkeypatch):
    never = dispatch.Kernel("never", "cpu", supports=lambda w, a, d: "not on this machine", prepare=lambda w: {},
                            run=lambda *a: (_ for _ in ()).throw(AssertionError("must not run")))
    monkeypatch.setattr(dispatch, "_KERNELS", [never])
    monkeypatch.setattr(dispatch, "_warned", set())
    layer = QuantLinear(quantize_weight(torch.randn(24, 64), QuantSpec("int", 2, "group", 32, symmetric=False)))
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.dispatch"):
        y1, y2 = layer(x), layer(x)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "reference kernel" in warnings[0] and "never: not on this machine" in warnings[0]
    assert torch.equal(y1, quantized_linear(x, layer.weight)) and torch.equal(y1, y2)


def test_reference_only_runs_the_reference_without_a_fallback_warning(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    layer = QuantLinear(quantize_weight(torch.randn(24, 64), QuantSpec("int", 2, "group", 32, symmetric=False)))
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.dispatch"), dispatch.reference_only():
        assert dispatch.choose(layer.weight, None, torch.device("cpu"), 3) is dispatch.REFERENCE
        assert torch.equal(layer(x), quantized_linear(x, layer.weight))
    assert not caplog.records
    assert dispatch._asked_for_reference is False  # restored on leaving


def test_a_kernel_is_prepared_once_per_device_and_chosen_by_m(monkeypatch):
    prepared = []
    small = dispatch.Kernel("small-m", "cpu", supports=lambda w, a, d: None,
                            prepare=lambda w: prepared.append(1) or {"w": w.dequantize()},
                            run=lambda x, p, w, b, a: x @ p["w"].T, max_m=4)
    monkeypatch.setattr(dispatch, "_KERNELS", [small])
    layer = QuantLinear(quantize_weight(torch.randn(24, 64), QuantSpec("int", 4, "group", 32)))
    w = layer.weight.dequantize()
    for m in (1, 4, 1):
        x = torch.randn(2, m, 64)
        assert torch.allclose(layer(x[0]), x[0] @ w.T, atol=1e-5)
    assert prepared == [1]  # once, not per call
    assert dispatch.choose(layer.weight, None, torch.device("cpu"), 4) is small
    assert dispatch.choose(layer.weight, None, torch.device("cpu"), 5) is dispatch.REFERENCE


@pytest.mark.parametrize("shape", [(3, 65), (65,), ()])
def test_quant_linear_names_a_shape_mismatch(shape):
    layer = QuantLinear(quantize_weight(torch.randn(24, 64), QuantSpec("int", 4, "group", 32)))
    with pytest.raises(LowbitError, match=r"expects inputs \(\.\.\., 64\)"):
        layer(torch.randn(shape))


def test_the_cpu_kernels_build_wherever_there_is_a_compiler():
    """The CPU kernel tests skip where the C++ kernels cannot be built. That has to mean no compiler, never a source
    that no longer compiles, which would turn every one of them into a skip and the run green."""
    from lowbit.kernels import cpu

    if os.environ.get("LOWBIT_NO_CPP") or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here, or LOWBIT_NO_CPP set")
    assert cpu.extension() is None, cpu.extension()
