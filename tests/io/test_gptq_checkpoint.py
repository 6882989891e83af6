"""GPTQ v1 export and import: the round trip, and the v1 dequantisation formula written out here from
its definition (AutoGPTQ's layout: codes packed down K, zero points stored minus one), independent of
lowbit's packing code."""

import json

import pytest
import torch

import lowbit
from lowbit.algorithms import GPTQ
from lowbit.errors import LowbitError
from lowbit.io import load_gptq, save_gptq
from lowbit.nn import quantized_modules
from lowbit.scheme import QuantSpec, Scheme

def INT(bits: int, group: int | None, sym: bool = True) -> Scheme:  # noqa: N802 - reads like the preset names
    return Scheme(QuantSpec("int", bits, "group" if group else "channel", group, symmetric=sym), name=f"W{bits}A16")




def v1_dequantize(qweight, qzeros, scales, g_idx, bits):
    """w (N, K) from the v1 tensors, by the definition: word [i, n] of qweight holds code (n, 32i/b + j) at
    bits b·j; qzeros likewise across N; zero = stored + 1."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per_word) * bits
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])  # (K, N)
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1) + 1  # (G, N)
    g = g_idx.long()
    return (scales[g].float() * (q.float() - z[g].float())).T  # (N, K)


CASES = {"w4-g32-sym": (INT(4, 32), None), "w4-g32-asym": (INT(4, 32, sym=False), None),
         "w8-channel-sym": (INT(8, None), None), "w2-g32-asym": (INT(2, 32, sym=False), None),
         "w4-g32-act-order": (INT(4, 32), "act_order")}


@pytest.mark.parametrize("name", CASES)
def test_round_trip_and_the_v1_formula(tiny, tmp_path, name):
    from safetensors.torch import load_file

    scheme, method = CASES[name]
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    q = lowbit.quantize(tiny, scheme, GPTQ(static_groups=False) if method else None, calib=calib if method else None,
                        progress=False)
    layers = quantized_modules(q)
    if name.startswith("w2") or not scheme.weights.symmetric:  # v1 cannot store a zero point of 0
        if any(bool((m.weight.zero_points() == 0).any()) for m in layers.values()):
            with pytest.raises(LowbitError, match="zero points of 0"):
                save_gptq(q, tmp_path / "gptq")
            return
    out = save_gptq(q, tmp_path / "gptq")
    config = json.loads((out / "quantize_config.json").read_text())
    assert config["bits"] == scheme.weights.bits and config["checkpoint_format"] == "gptq"
    assert config["desc_act"] == (method == "act_order")
    tensors = load_file(str(out / "model.safetensors"))
    for layer, mod in layers.items():
        t = {key: tensors[f"{layer}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
        w = v1_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], scheme.weights.bits)
        assert torch.equal(w, mod.weight.dequantize(torch.float32)), layer
    back = load_gptq(out)
    for layer, mod in quantized_modules(back).items():
        assert torch.equal(mod.weight.dequantize(), layers[layer].weight.dequantize()), layer
        assert torch.equal(mod.weight.codes(), layers[layer].weight.codes())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_what_v1_cannot_hold_is_refused_with_the_layer_named(tiny, tmp_path):
    for scheme, match in ((INT(3, 32), "2, 4 and 8 bits"),
                          (Scheme(QuantSpec("int", 4, "group", 32, scale_dtype="bfloat16"), name="bf16"),
                           "float16 scales"),
                          (lowbit.NF4, "integer weight-only")):
        q = lowbit.quantize(tiny, scheme, progress=False)
        with pytest.raises(LowbitError, match=r"layer model\.layers\.0\.self_attn\.q_proj .*" + match):
            save_gptq(q, tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_a_misshapen_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_gptq(lowbit.quantize(tiny, INT(4, 32), progress=False), tmp_path / "gptq")
    tensors = load_file(str(out / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.qzeros"
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(LowbitError, match=key.replace(".", r"\.") + r" in .* is torch\.int64"):
        load_gptq(out)


def test_a_zero_point_of_zero_is_refused_not_written_wrong(tiny, tmp_path):
    import copy

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.abs_()  # every group's minimum ≥ 0: asymmetric zero point 0
    q = lowbit.quantize(model, INT(4, 32, sym=False), progress=False)
    assert bool((quantized_modules(q)["model.layers.1.mlp.down_proj"].weight.zero_points() == 0).any())
    with pytest.raises(LowbitError, match=r"layer model\.layers\.1\.mlp\.down_proj .*zero points of 0"):
        save_gptq(q, tmp_path / "gptq")
