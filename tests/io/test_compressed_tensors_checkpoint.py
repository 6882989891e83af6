"""compressed-tensors export and import: lowbit's round trip, and the compressed-tensors package as the
reader that defines the format (its compressors decompress our tensors to the same floats)."""

import json

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.io import load_compressed_tensors, save_compressed_tensors
from lowbit.nn import quantized_modules
from lowbit.scheme import QuantSpec, Scheme, get_scheme

ct = pytest.importorskip("compressed_tensors")

def INT(bits: int, group: int | None, sym: bool = True) -> Scheme:  # noqa: N802 - reads like the preset names
    return Scheme(QuantSpec("int", bits, "group" if group else "channel", group, symmetric=sym), name=f"W{bits}A16")
SCHEMES = {
    "w4-g32-sym": INT(4, 32),
    "w4-g32-asym": INT(4, 32, sym=False),
    "w3-g32-asym": INT(3, 32, sym=False),
    "w2-channel-sym": INT(2, None),
    "w8-channel-bf16-scales": Scheme(QuantSpec("int", 8, "channel", scale_dtype="bfloat16"), name="W8A16"),
    "w8a8": get_scheme("W8A8"),
    "fp8": get_scheme("FP8"),
}




@pytest.mark.parametrize("name", SCHEMES)
def test_round_trip_keeps_packed_tensors_and_logits(tiny, tmp_path, name):
    q = lowbit.quantize(tiny, SCHEMES[name], progress=False)
    out = save_compressed_tensors(q, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    back = load_compressed_tensors(out)
    before, after = quantized_modules(q), quantized_modules(back)
    assert before.keys() == after.keys() and len(before) == 14
    for layer, mod in before.items():
        for buf, tensor in mod.weight.tensors().items():
            assert torch.equal(tensor, after[layer].weight.tensors()[buf]), (layer, buf)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


@pytest.mark.parametrize("name", SCHEMES)
def test_the_compressed_tensors_package_decompresses_our_tensors_to_our_floats(tiny, tmp_path, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    q = lowbit.quantize(tiny, SCHEMES[name], progress=False)
    out = save_compressed_tensors(q, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                input_activations=group["input_activations"])
    compressor = BaseCompressor.load_from_registry(group["format"])
    tensors = load_file(str(out / "model.safetensors"))
    for layer, mod in quantized_modules(q).items():
        local = {key[len(layer) + 1:]: t for key, t in tensors.items() if key.startswith(layer + ".")}
        weight = compressor.decompress(local, scheme)["weight"]
        ours = mod.weight.dequantize(torch.float32).to(weight.dtype)
        assert weight.shape == ours.shape and torch.equal(weight, ours), layer


def test_what_the_format_cannot_hold_is_refused_with_the_layer_named(tiny, tmp_path):
    for scheme, match in ((get_scheme("NF4"), "no compressed-tensors form"),
                          (INT(4, 40), "not a multiple of the group size 40")):
        q = lowbit.quantize(tiny, scheme, progress=False)
        with pytest.raises(LowbitError, match=r"layer model\.layers\.0\.self_attn\.q_proj .*" + match):
            save_compressed_tensors(q, tmp_path / scheme.name)
        assert not (tmp_path / scheme.name).exists()


def test_a_missing_or_misshapen_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_compressed_tensors(lowbit.quantize(tiny, INT(4, 32), progress=False), tmp_path / "ct")
    tensors = load_file(str(out / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight_packed"
    save_file({k: t for k, t in tensors.items() if k != key}, str(out / "model.safetensors"))
    with pytest.raises(LowbitError, match=key.replace(".", r"\.") + " is missing"):
        load_compressed_tensors(out)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"weight_packed .* expected int32"):
        load_compressed_tensors(out)


# Asymmetric pack-quantized is left out: transformers 5.24 with compressed-tensors 0.19 builds its skeleton
# with unpacked zero points (N, G) and refuses the packed (⌈N·b/32⌉, G) tensor that the package's own
# compressor writes (and that its decompressor reads, as the test above shows for our export).
@pytest.mark.parametrize("name", ["w4-g32-sym", "w2-channel-sym", "w8a8", "fp8"])
def test_transformers_loads_the_export_and_gives_our_logits(tiny, tmp_path, name):
    from transformers import AutoModelForCausalLM

    q = lowbit.quantize(tiny, SCHEMES[name], progress=False)
    out = save_compressed_tensors(q, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # its compressed-tensors quantizer
    assert not quantized_modules(hf)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = q(ids).logits, hf(ids).logits
    if name == "w8a8":  # activations are quantised per call by each side's own code: rounding ties may differ
        assert (ours - theirs).abs().max() <= 0.02 * ours.abs().max()
    else:  # weight-only / same FP8 arithmetic: the decompressed weights are ours exactly
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
