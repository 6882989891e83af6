"""`QuantLinear` holding GPTQ act-order codes in group order: once, and given back as checkpoints hold them."""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels.reference import quantized_linear
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec
from lowbit.tensor import quantize_weight

SPECS = [QuantSpec("int", 4, "group", 32, symmetric=False), QuantSpec("int", 3, "group", 64),
         QuantSpec("int", 2, "group", 16, symmetric=False), QuantSpec("int", 8, "group", 32)]


def act_order(spec: QuantSpec, rows: int, cols: int, seed: int, uneven: bool = False):
    """A weight with GPTQ's g_idx (its groups' columns put in a random column order) or, ``uneven``, any group for
    any column."""
    gen = torch.Generator().manual_seed(seed)
    weight = quantize_weight(torch.randn(rows, cols, generator=gen), spec)
    if uneven:
        g_idx = torch.randint(0, weight.scale_shape[1], (cols,), generator=gen, dtype=torch.int32)
        return dataclasses.replace(weight, g_idx=g_idx)
    return weight.in_column_order(torch.randperm(cols, generator=gen))


def assert_same_weight(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(SPECS), rows=st.integers(1, 40), groups=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_act_order_codes_are_held_once_and_given_back_as_stored(spec, rows, groups, seed):
    """The layer's buffers are the packed size (codes in group order, ``perm`` in the g_idx's place, no second copy
    anywhere); `weight` and ``state_dict()`` rebuild the checkpoint's column order and g_idx bit for bit; the
    output is the reference's product of the stored weight."""
    weight = act_order(spec, rows, groups * spec.group_size, seed)
    layer = QuantLinear(weight, torch.randn(rows))
    assert "perm" in layer._buffers and "g_idx" not in layer._buffers
    assert sum(b.nbytes for b in layer.buffers()) == weight.nbytes == layer.stored_nbytes and layer.has_g_idx
    assert_same_weight(layer.weight, weight)
    state = layer.state_dict()
    assert state.keys() == {"bias", *weight.tensors()}
    assert all(torch.equal(state[k], t) for k, t in weight.tensors().items())
    x = torch.randn(3, weight.shape[1])
    ref = quantized_linear(x, weight, layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5 * (1 + ref.abs().max().item()))


@pytest.mark.parametrize("assign", [False, True])
def test_a_checkpoints_column_order_loads_into_group_order(assign):
    """Loading takes the checkpoint's form (column order, g_idx) into a layer built empty or from another weight,
    and keeps it in group order; a g_idx that is not runs of groups stays as it is."""
    weight = act_order(SPECS[0], 24, 160, 1)
    state = QuantLinear(weight).state_dict()
    for target in (QuantLinear.empty((24, 160), SPECS[0], g_idx=True), QuantLinear(act_order(SPECS[0], 24, 160, 2))):
        target.load_state_dict(state, assign=assign)
        assert "perm" in target._buffers and "g_idx" not in target._buffers
        assert_same_weight(target.weight, weight)
        x = torch.randn(2, 160)
        torch.testing.assert_close(target(x), quantized_linear(x, weight), rtol=1e-5, atol=1e-4)
    uneven = act_order(SPECS[0], 24, 160, 3, uneven=True)
    target = QuantLinear(weight)
    target.load_state_dict(QuantLinear(uneven).state_dict(), assign=assign)
    assert "g_idx" in target._buffers and "perm" not in target._buffers
    assert_same_weight(target.weight, uneven)


def test_copies_and_devices_keep_the_order():
    weight = act_order(SPECS[1], 16, 128, 4)
    layer = QuantLinear(weight)
    x = torch.randn(1, 128)
    y = layer(x)
    for other in (copy.deepcopy(layer), layer.to("cpu"), QuantLinear(layer.weight)):
        assert torch.equal(other(x), y)
        assert_same_weight(other.weight, weight)


def test_a_checkpoint_layout_state_dict_rebuilds_no_codes(monkeypatch):
    """Within `checkpoint_layout` the state dict has the checkpoint's keys, shapes, dtypes and g_idx without
    rebuilding the codes (what the writers and loaders use to check layouts and to leave the quantised layers out);
    outside it, the codes come back in column order."""
    from lowbit.nn import checkpoint_layout
    from lowbit.tensor import QuantizedWeight

    weight = act_order(SPECS[0], 24, 160, 5)
    layer = QuantLinear(weight)
    full = layer.state_dict()
    rebuilt = []
    original = QuantizedWeight.in_column_order
    monkeypatch.setattr(QuantizedWeight, "in_column_order", lambda *a: rebuilt.append(1) or original(*a))
    with checkpoint_layout():
        cheap = layer.state_dict()
    assert not rebuilt
    assert cheap.keys() == full.keys()
    assert all(cheap[k].shape == full[k].shape and cheap[k].dtype == full[k].dtype for k in full)
    assert torch.equal(cheap["g_idx"], weight.g_idx) and torch.equal(cheap["qdata"], layer.qdata)
    assert torch.equal(layer.state_dict()["qdata"], weight.qdata) and rebuilt
