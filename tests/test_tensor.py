"""QuantizedWeight: every format through one container; accounting equals bytes stored."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec
from lowbit.tensor import (QuantizedWeight, expected_layout, fake_quantize, quantize_weight, rtn_dequantized,
                           storage_bytes)

SPECS = [
    QuantSpec("int", 4, "group", 128),
    QuantSpec("int", 4, "group", 128, symmetric=False),
    QuantSpec("int", 3, "group", 64, symmetric=False),
    QuantSpec("int", 2, "group", 64, symmetric=False),
    QuantSpec("int", 8, "channel"),
    QuantSpec("int", 8, "tensor", scale_dtype="float32"),
    QuantSpec("int", 5, "group", 100, symmetric=False, scale_dtype="bfloat16"),
    QuantSpec("nf4", 4, "group", 64),
    QuantSpec("nf4", 4, "group", 64, double_quant=True),
    QuantSpec("fp4", 4, "group", 32),
    QuantSpec("fp8_e4m3", 8, "channel", scale_dtype="float32"),
    QuantSpec("fp8_e5m2", 8, "tensor", scale_dtype="float32"),
    QuantSpec("int", 4, "group", 128, observer="mse"),
    QuantSpec("int", 4, "group", 128, symmetric=False, observer="percentile", percentile=0.99),
]
IDS = [f"{s.describe()}-{s.observer}{'-dq' if s.double_quant else ''}" for s in SPECS]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 24), st.integers(1, 300), st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_accounting_equals_bytes_stored(spec, rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    qw = quantize_weight(w, spec)
    stored = sum(t.numel() * t.element_size() for t in qw.tensors().values())
    assert qw.nbytes == stored == storage_bytes(spec, (rows, cols))
    assert qw.bits_per_weight == pytest.approx(8 * stored / (rows * cols))
    layout = expected_layout(spec, (rows, cols))
    assert {k: (tuple(t.shape), t.dtype) for k, t in qw.tensors().items()} == layout
    deq = qw.dequantize()
    assert deq.shape == (rows, cols) and torch.isfinite(deq).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_round_trip_through_stored_tensors(spec):
    w = torch.randn(37, 576, generator=torch.Generator().manual_seed(1)) * 0.05
    qw = quantize_weight(w, spec)
    again = QuantizedWeight.from_tensors({k: v.clone() for k, v in qw.tensors().items()}, qw.shape, spec)
    assert torch.equal(again.dequantize(), qw.dequantize())
    assert torch.equal(again.codes(), qw.codes())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_dequantize_in_row_blocks_equals_one_block(spec, monkeypatch):
    """dequantize decodes a block of rows at a time (memory): blocks of one row, of rows that do not divide the
    weight, or of everything give the same floats; with act-order's scattered groups (g_idx) too."""
    import lowbit.tensor as tensor_module

    w = torch.randn(37, 576, generator=torch.Generator().manual_seed(2)) * 0.05
    weights = [quantize_weight(w, spec)]
    if spec.format == "int" and spec.granularity == "group":
        qw = weights[0]
        g_idx = torch.randperm(576, generator=torch.Generator().manual_seed(3)) // spec.group_size
        weights.append(QuantizedWeight(qw.qdata, qw.scale, qw.zero_point, qw.shape, spec, g_idx=g_idx.int()))
    for qw in weights:
        whole = qw.dequantize(torch.bfloat16)
        for codes in (1, 576 * 5 + 7, 576 * 37):
            monkeypatch.setattr(tensor_module, "DEQUANT_CODES", codes)
            assert torch.equal(qw.dequantize(torch.bfloat16), whole)
        monkeypatch.undo()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_quantisation_quality_is_what_the_format_allows(spec):
    """SQNR of a Gaussian weight: about 6 dB per bit for integers, never nonsense."""
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(2))
    deq = quantize_weight(w, spec).dequantize()
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum()).item()
    floor = 20.0 if spec.format == "fp8_e5m2" else {2: 5.0, 3: 11.0, 4: 17.0, 5: 22.0, 8: 29.0}[spec.bits]
    assert sqnr > floor


def test_symmetric_codes_are_signed():
    w = torch.tensor([[-7.0, -3.5, 0.0, 2.5, 7.0, 1.5, -0.5, 4.4]])  # absmax 7 → scale exactly 1
    qw = quantize_weight(w, QuantSpec("int", 4, "channel", scale_dtype="float32"))
    assert qw.codes().tolist() == [[-7, -4, 0, 2, 7, 2, 0, 4]]  # ties round half to even
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (1, 4)


def test_nan_and_inf_are_named():
    w = torch.ones(4, 8)
    w[1, 2] = float("inf")
    w[3, 3] = float("nan")
    with pytest.raises(LowbitError, match=r"tensor layers\.7\.up\.weight contains 2 NaN or Inf value\(s\)"):
        quantize_weight(w, QuantSpec(), name="layers.7.up.weight")


def test_non_2d_weights_are_refused():
    with pytest.raises(LowbitError, match="must be 2-D"):
        quantize_weight(torch.ones(2, 3, 4), QuantSpec())


def test_from_tensors_names_the_bad_tensor():
    qw = quantize_weight(torch.randn(8, 64), QuantSpec("int", 4, "group", 32, symmetric=False))
    tensors = qw.tensors()
    with pytest.raises(LowbitError, match=r"tensor blk\.0\.zero_point is missing"):
        QuantizedWeight.from_tensors({k: v for k, v in tensors.items() if k != "zero_point"}, (8, 64), qw.spec,
                                     name="blk.0")
    bad = dict(tensors, scale=tensors["scale"].float())
    with pytest.raises(LowbitError, match=r"tensor blk\.0\.scale has shape \(8, 2\) and dtype torch.float32"):
        QuantizedWeight.from_tensors(bad, (8, 64), qw.spec, name="blk.0")


def test_double_quant_saves_bits():
    w = torch.randn(256, 512)
    plain = quantize_weight(w, QuantSpec("nf4", 4, "group", 64))
    dq = quantize_weight(w, QuantSpec("nf4", 4, "group", 64, double_quant=True))
    assert plain.bits_per_weight == pytest.approx(4 + 16 / 64)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())
    err_plain = (plain.dequantize() - w).pow(2).mean()
    err_dq = (dq.dequantize() - w).pow(2).mean()
    assert err_dq < 1.05 * err_plain


def test_mse_observer_never_worse_than_minmax_on_heavy_tails():
    w = torch.distributions.StudentT(3.0).sample((64, 512))
    minmax = quantize_weight(w, QuantSpec("int", 3, "group", 128, symmetric=False)).dequantize()
    mse = quantize_weight(w, QuantSpec("int", 3, "group", 128, symmetric=False, observer="mse")).dequantize()
    assert (mse - w).pow(2).sum() < (minmax - w).pow(2).sum()


@pytest.mark.parametrize("spec", [QuantSpec("int", 8, "token", scale_dtype="float32"),
                                  QuantSpec("fp8_e4m3", 8, "token", scale_dtype="float32"),
                                  QuantSpec("int", 8, "tensor", scale_dtype="float32")])
def test_fake_quantize_activations_per_token(spec):
    x = torch.randn(2, 5, 64)
    x[0, 1] *= 100  # one loud token must not hurt the others when scales are per token
    y = fake_quantize(x, spec)
    assert y.shape == x.shape and y.dtype == x.dtype
    quiet = (y[1] - x[1]).abs().max() / x[1].abs().max()
    assert quiet < (0.07 if spec.format.startswith("fp8") else 0.01) or spec.granularity == "tensor"


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), bits=st.sampled_from([4, 8]),
       granularity=st.sampled_from(["token", "tensor"]), zero_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fake_quantize_fast_path_equals_the_general_formula(rows, cols, bits, granularity, zero_row, seed):
    """Symmetric float32-scaled activations take a short path; it must give the general path's values exactly."""
    from lowbit.formats import choose_qparams_affine, dequantize_affine, group_minmax, quantize_affine

    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed % 7 - 3)
    if zero_row:
        x[0] = 0.0
    flat = x.reshape(1, -1) if granularity == "tensor" else x
    lo, hi = group_minmax(flat, flat.shape[1])
    s, _ = choose_qparams_affine(lo, hi, bits, True, torch.float32)
    general = dequantize_affine(quantize_affine(flat, s, None, bits, True, flat.shape[1]), s, None, flat.shape[1])
    fast = fake_quantize(x, QuantSpec("int", bits, granularity, scale_dtype="float32"))
    assert torch.equal(fast, general.reshape(x.shape))


GROUPED = [s for s in SPECS if s.granularity == "group"]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 24), st.integers(1, 300), st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("spec", GROUPED, ids=[f"{s.describe()}{'-dq' if s.double_quant else ''}" for s in GROUPED])
def test_act_order_weights_sort_into_plain_groups(spec, rows, cols, seed):
    """GPTQ's g_idx (group i holds the columns ranked i·g .. (i+1)·g − 1) sorts into runs of whole groups: the
    same codes with the columns in that order are a plain grouped weight, bit for bit the columns of the original
    (the last group short or not); any other g_idx does not, and a weight without one has no order."""
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(rows, cols, generator=gen), spec)
    assert qw.group_order() is None and qw.in_group_order() is None
    g_idx = (torch.argsort(torch.randperm(cols, generator=gen)) // qw.group_size).int()
    ordered = dataclasses.replace(qw, g_idx=g_idx)
    perm, plain = ordered.in_group_order()
    assert torch.equal(g_idx[perm].long(), torch.arange(cols) // qw.group_size)
    assert plain.g_idx is None and plain.qdata.shape == qw.qdata.shape and plain.scale is qw.scale
    assert torch.equal(plain.dequantize(), ordered.dequantize()[:, perm])
    if qw.scale_shape[1] > 1:  # a column of group 0 moved to the last group: no longer runs of group_size
        g_idx = g_idx.clone()
        g_idx[(g_idx == 0).nonzero()[0]] = qw.scale_shape[1] - 1
        scattered = dataclasses.replace(qw, g_idx=g_idx)
        assert scattered.group_order()[1] is not None and scattered.in_group_order() is None


INTEGER = [(s, i) for s, i in zip(SPECS, IDS) if s.format == "int"]  # the others take the packed round trip itself


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 24), st.integers(1, 300), st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("spec", [s for s, _ in INTEGER], ids=[i for _, i in INTEGER])
def test_the_planners_round_trip_without_packing_is_the_packed_ones(spec, rows, cols, seed):
    """What the bit planner scores a candidate by: bit for bit the dequantised packed weight, any observer and
    granularity."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    assert torch.equal(rtn_dequantized(w, spec), quantize_weight(w, spec).dequantize())
