"""GPTQ (v1) checkpoints: the layout AutoGPTQ introduced and GPTQModel, transformers and vLLM read.

Each quantised linear ``L`` with N outputs, K inputs, b ∈ {2, 4, 8} bits and G groups:

    L.qweight  (K·b/32, N) int32    codes packed down the input dimension: word [i, n] holds
                                    code (n, 32i/b + j) in bits b·j..b·j+b (LSB first)
    L.qzeros   (G, N·b/32) int32    zero points packed across the outputs the same way, each
                                    stored as zero − 1: the historical v1 offset (AutoGPTQ's
                                    dequantisation adds the 1 back), so a zero point of 0
                                    cannot be written
    L.scales   (G, N) float16
    L.g_idx    (K,) int32           the group of each input column (k // group without act-order)
    L.bias     (N,) float16         when the layer has one

    w[n, k] = scales[g_idx[k], n] · (q[n, k] − (qzeros[g_idx[k], n] + 1))

The tensors are in ``model.safetensors`` or, above ``max_shard_size``, in shards
``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json``, each
layer's tensors in one shard (see `lowbit.io.shards`); without an index every
``*.safetensors`` file of the directory is read (peer tools name theirs freely).
``quantize_config.json`` (and ``quantization_config`` in ``config.json``) give bits,
group_size, desc_act, sym and ``checkpoint_format: "gptq"``. Symmetric weights are
stored with zero point 2^(b−1), as GPTQ kernels expect. What v1 cannot hold is refused
with the layer named: 3-bit (AutoGPTQ's 3-bit word layout is its own), NF4/FP8,
per-tensor scales, scales that are not float16, K or N not a multiple of 32/b, and
asymmetric zero points of 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import pack, unpack
from lowbit.io.native import atomic_directory
from lowbit.io.shards import DEFAULT_MAX_SHARD_SIZE, INDEX, load_tensors, parse_size, save_tensors
from lowbit.io.skeleton import (
    build_model,
    float_tensors,
    json_object,
    layers_to_export,
    load_float_tensors,
    read_config,
)
from lowbit.models import set_submodule
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

QUANTIZE_CONFIG = "quantize_config.json"


def is_gptq_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if (path / QUANTIZE_CONFIG).is_file():
        return True
    try:
        qc = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
        return qc.get("quant_method") == "gptq"
    except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object: not ours to claim
        return False


def _layer_config(name: str, layer: QuantLinear) -> dict[str, Any]:
    spec, w = layer.spec, layer.weight
    where = f"layer {name} ({spec.describe()})"
    if layer.activations is not None or spec.format != "int":
        raise LowbitError(f"{where}: GPTQ checkpoints hold integer weight-only layers.")
    if spec.bits not in (2, 4, 8):
        raise LowbitError(f"{where}: GPTQ v1 is written here for 2, 4 and 8 bits.")
    if spec.granularity not in ("group", "channel") or spec.double_quant:
        raise LowbitError(f"{where}: GPTQ needs per-group or per-channel float16 scales.")
    if w.scale.dtype != torch.float16:
        raise LowbitError(f"{where}: GPTQ stores float16 scales, these are {w.scale.dtype}; quantise with "
                          "scale_dtype float16.")
    per_word = 32 // spec.bits
    if layer.in_features % per_word or layer.out_features % per_word:
        raise LowbitError(f"{where}: {layer.out_features} × {layer.in_features} is not a multiple of {per_word} "
                          "in both dimensions, which GPTQ's packing needs.")
    zeros = w.zero_points()
    if zeros is not None and bool((zeros == 0).any()):
        raise LowbitError(f"{where} has zero points of 0, which GPTQ v1's zero − 1 storage cannot hold.")
    return {"bits": spec.bits, "group_size": w.group_size if spec.granularity == "group" else -1,
            "desc_act": w.g_idx is not None, "sym": spec.symmetric}


def _layer_tensors(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    w = layer.weight
    bits, cols = w.spec.bits, w.shape[1]
    codes = unpack(w.qdata, bits, cols)  # (N, K) stored, unsigned codes (symmetric ones offset by 2^(b−1))
    zeros = w.zero_points()  # (N, G) or None
    if zeros is None:
        zeros = torch.full(w.scale_shape, 1 << (bits - 1), dtype=torch.int32)
    g_idx = w.g_idx.to(torch.int32) if w.g_idx is not None else (
        torch.arange(cols, dtype=torch.int32) // w.group_size)
    out = {
        "qweight": pack(codes, bits, torch.int32).T.contiguous(),  # (K·b/32, N)
        "qzeros": pack(((zeros - 1) & ((1 << bits) - 1)).T.contiguous(), bits, torch.int32),  # (G, N·b/32)
        "scales": w.scale.reshape(w.scale_shape).T.contiguous(),  # (G, N)
        "g_idx": g_idx.contiguous(),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(torch.float16).contiguous()
    return {f"{name}.{key}": t for key, t in out.items()}


def save_gptq(model: nn.Module, out: str | Path, tokenizer: Any = None, overwrite: bool = False,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a lowbit-quantised HF model as a GPTQ v1 checkpoint in directory ``out``, in shards above
    ``max_shard_size`` (bytes, or a string such as "2GB")."""
    parse_size(max_shard_size)  # a bad size is refused before anything is written
    layers = layers_to_export(model, "GPTQ")
    configs = {name: _layer_config(name, layer) for name, layer in layers.items()}
    first = next(iter(configs.values()))
    for name, cfg in configs.items():
        if cfg != first:
            raise LowbitError(f"layer {name} is quantised as {cfg}, another as {first}: a GPTQ checkpoint holds one "
                              "scheme.")
    quantized = {f"{name}.{buf}" for name, m in layers.items() for buf in m.buffer_keys()}
    quantized |= {f"{name}.bias" for name in layers}

    def units():  # one layer's repacked tensors at a time: made as the shard that holds them fills
        yield from (_layer_tensors(name, layer) for name, layer in layers.items())
        yield from ({key: t} for key, t in float_tensors(model, quantized).items())

    head = model.get_output_embeddings()
    quantize_config = {**first, "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
                       "checkpoint_format": "gptq", "quant_method": "gptq", "model_file_base_name": "model",
                       "lm_head": any(layer is head for layer in layers.values())}  # GPTQModel's flag for it
    with atomic_directory(out, overwrite) as tmp:
        config_dict = model.config.to_dict()
        config_dict["quantization_config"] = quantize_config
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        (tmp / QUANTIZE_CONFIG).write_text(json.dumps(quantize_config, indent=2) + "\n", encoding="utf-8")
        save_tensors(tmp, units(), max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _read_quantize_config(path: Path) -> dict[str, Any]:
    for file, key in ((path / QUANTIZE_CONFIG, None), (path / "config.json", "quantization_config")):
        if file.is_file():
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, ValueError) as err:
                raise LowbitError(f"could not read '{file}' ({err}).") from err
            data = json_object(text, file)
            data = data.get(key) if key else data
            if data and not isinstance(data, dict):
                raise LowbitError(f"'{file}': the GPTQ quantization config is not a JSON object.")
            if data:
                if data.get("checkpoint_format", "gptq") != "gptq":
                    raise LowbitError(f"'{file}': checkpoint_format {data['checkpoint_format']!r} is not GPTQ v1.")
                return data
    raise LowbitError(f"'{path}' has no GPTQ quantize_config.json nor a gptq quantization_config.")


def _weight_from_gptq(name: str, tensors: dict[str, torch.Tensor], bits: int, group: int, shape: tuple[int, int],
                      file: Path) -> QuantizedWeight:
    rows, cols = shape
    per_word = 32 // bits

    def get(key: str, dtype: torch.dtype, dims: tuple[int, ...]) -> torch.Tensor:
        t = tensors.get(f"{name}.{key}")
        if t is None:
            raise LowbitError(f"tensor {name}.{key} is missing from '{file}'.")
        if t.dtype != dtype or tuple(t.shape) != dims:
            raise LowbitError(f"tensor {name}.{key} in '{file}' is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                              f"{dims}.")
        return t

    groups = -(-cols // group) if group > 0 else 1
    qweight = get("qweight", torch.int32, (cols // per_word, rows))
    qzeros = get("qzeros", torch.int32, (groups, rows // per_word))
    scales = get("scales", torch.float16, (groups, rows))
    g_idx = get("g_idx", torch.int32, (cols,)) if f"{name}.g_idx" in tensors else None
    codes = unpack(qweight.T.contiguous(), bits, cols)  # (N, K)
    zeros = (unpack(qzeros, bits, rows) + 1).T.contiguous()  # (N, G)
    if bool((zeros > (1 << bits) - 1).any()):
        raise LowbitError(f"tensor {name}.qzeros in '{file}' holds a zero point of {1 << bits} (a stored −1), "
                          "which lowbit's codes cannot represent.")
    plain = torch.arange(cols, dtype=torch.int32) // (group if group > 0 else cols)
    if g_idx is not None and (bool((g_idx < 0).any()) or bool((g_idx >= groups).any())):
        raise LowbitError(f"tensor {name}.g_idx in '{file}' names groups outside 0..{groups - 1}.")
    act_order = g_idx is not None and not torch.equal(g_idx, plain)
    symmetric = bool((zeros == 1 << (bits - 1)).all())
    spec = QuantSpec("int", bits, "group" if group > 0 else "channel", group if group > 0 else None,
                     symmetric=symmetric, scale_dtype="float16")
    found = {"qdata": pack(codes, bits), "scale": scales.T.contiguous()}
    if not symmetric:
        found["zero_point"] = pack(zeros, bits)
    if act_order:
        found["g_idx"] = g_idx
    return QuantizedWeight.from_tensors(found, shape, spec, name=f"{file}:{name}")


def load_gptq(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a GPTQ v1 checkpoint (ours, AutoGPTQ's or GPTQModel's; one file or shards) as a lowbit model."""
    path = Path(path)
    qc = _read_quantize_config(path)
    bits, group = int(qc.get("bits", 0)), int(qc.get("group_size", -1))
    if bits not in (2, 4, 8):
        raise LowbitError(f"'{path}': {bits}-bit GPTQ is not read here (2, 4 or 8 bits).")
    files = sorted(path.glob("*.safetensors"))
    if not files and not (path / INDEX).is_file():
        raise LowbitError(f"'{path}' holds no .safetensors weights (lowbit never unpickles .bin files).")
    stored = load_tensors(path, files)
    tensors = stored.tensors
    config = read_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_model(config, dtype, path)
    taken = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in tensors:
            weight = _weight_from_gptq(name, tensors, bits, group, (module.out_features, module.in_features),
                                       stored.file(f"{name}.qweight"))
            bias = tensors.pop(f"{name}.bias", None)
            set_submodule(model, name, QuantLinear(weight, None if bias is None else bias.to(dtype)))
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                tensors.pop(f"{name}.{key}", None)
            taken.append(name)
    if not taken:
        raise LowbitError(f"'{path}' has no qweight tensor for any linear layer of the model.")
    return load_float_tensors(model, tensors, taken, stored.where, dtype, stored.files)
