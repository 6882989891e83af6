"""Schemes and specs: validation with one-sentence errors, presets, exact round trips."""

import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.scheme import PRESETS, QuantSpec, Scheme, get_scheme, scheme_with


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict(name):
    scheme = PRESETS[name]
    again = Scheme.from_dict(scheme.to_dict())
    assert again == scheme
    assert hash(again) == hash(scheme)


def test_presets_are_what_the_design_names():
    assert lowbit.W4A16.weights == QuantSpec("int", 4, "group", 128, True)
    assert not lowbit.W4A16_ASYM.weights.symmetric
    assert lowbit.W8A16.weights.granularity == "channel" and lowbit.W8A16.activations is None
    assert lowbit.W8A8.activations.granularity == "token" and lowbit.W8A8.activations.dynamic
    assert lowbit.FP8.weights.format == "fp8_e4m3" and lowbit.FP8.activations.format == "fp8_e4m3"
    assert lowbit.NF4.weights.format == "nf4" and lowbit.NF4.weights.group_size == 64
    assert lowbit.W3A16.weights.bits == 3 and lowbit.W2A16.weights.bits == 2


def test_get_scheme_is_case_insensitive_and_names_choices():
    assert get_scheme("w4a16") is lowbit.W4A16
    with pytest.raises(LowbitError, match="unknown scheme 'W5A16'.*W4A16"):
        get_scheme("W5A16")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=9), "bits must be an integer from 2 to 8, got 9"),
        (dict(bits=1), "bits must be an integer from 2 to 8, got 1"),
        (dict(granularity="group", group_size=0), "group size must be a positive integer, got 0"),
        (dict(granularity="group", group_size=-64), "group size must be a positive integer, got -64"),
        (dict(granularity="group"), "group size must be a positive integer, got None"),
        (dict(format="int5"), "format must be one of"),
        (dict(observer="max"), "observer must be one of"),
        (dict(format="nf4", symmetric=False), "asymmetric applies to int only"),
        (dict(double_quant=True), "double_quant applies to the nf4 format only"),
        (dict(scale_dtype="float64"), "scale_dtype must be one of"),
    ],
)
def test_bad_specs_are_refused_with_one_sentence(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        QuantSpec(**kwargs)


def test_fixed_width_formats_imply_their_bits():
    assert QuantSpec("nf4", granularity="group", group_size=64).bits == 4
    assert QuantSpec("fp8_e5m2").bits == 8


def test_scheme_with_overrides_the_weight_spec():
    s = scheme_with(lowbit.W4A16, group_size=64, symmetric=False)
    assert s.weights.group_size == 64 and not s.weights.symmetric
    assert scheme_with(lowbit.W4A16, group_size=None).weights.granularity == "channel"
    assert scheme_with(lowbit.W4A16) is lowbit.W4A16
    with pytest.raises(LowbitError, match="group size must be a positive integer, got 0"):
        scheme_with(lowbit.W4A16, group_size=0)


def test_group_size_for_ragged_and_tensor():
    spec = QuantSpec("int", 4, "group", 128)
    assert spec.group_size_for(576) == 128
    assert QuantSpec().group_size_for(576) == 576
    assert QuantSpec(granularity="tensor").group_size_for(576, rows=3) == 3 * 576


def test_unknown_spec_field_is_refused():
    with pytest.raises(LowbitError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"format": "int", "bitz": 4})


def test_lm_head_setting_round_trips_and_leaves_other_dicts_as_they_were():
    s = scheme_with(lowbit.W4A16, group_size=64, lm_head="int8")
    assert s.lm_head == QuantSpec("int", 8, "channel") and s.weights.group_size == 64
    assert Scheme.from_dict(s.to_dict()) == s
    assert "lm_head int8 sym per-channel" in s.describe()
    assert scheme_with(lowbit.NF4, lm_head="same").lm_head == lowbit.NF4.weights
    assert scheme_with(s, group_size=32).lm_head == s.lm_head  # None keeps it
    assert scheme_with(s, lm_head="float").lm_head is None
    assert "lm_head" not in lowbit.W4A16.to_dict()  # checkpoints written before the field read the same
    with pytest.raises(LowbitError, match="unknown lm_head setting 'int3'; choose float, same or int8"):
        scheme_with(lowbit.W4A16, lm_head="int3")
    with pytest.raises(LowbitError, match="lm_head spec is a weight spec"):
        lowbit.W4A16.replace(lm_head=QuantSpec("int", 8, "token", dynamic=True))
