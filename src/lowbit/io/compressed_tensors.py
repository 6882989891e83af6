"""compressed-tensors checkpoints: the format vLLM, SGLang and transformers load quantised models from.

A directory with the model's ``config.json`` carrying a ``quantization_config`` with
``"quant_method": "compressed-tensors"``, ``model.safetensors`` (or, above ``max_shard_size``,
shards ``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json``, each
quantised layer's tensors in one shard: see `lowbit.io.shards`) and the tokenizer files.
Each quantised linear ``L`` is stored in one of three formats (the compressed-tensors
package, version 0.19, defines them; its own compressors are the reference this module
was checked against, see tests/io/test_compressed_tensors_checkpoint.py):

- ``pack-quantized`` (integer weight-only, 2–8 bits, per group or per channel):
  ``L.weight_packed`` int32 (N, ⌈K·b/32⌉) — the b-bit codes, offset to unsigned by
  2^(b−1), as one little-endian bit stream per row: code i at bit b·i. That is lowbit's own
  packing (``qdata``, LSB-first bytes) read as 32-bit words, so export and import are
  zero-padding and a reinterpretation, never a repack. ``L.weight_scale`` (N, G),
  ``L.weight_shape`` int64 [N, K], and for asymmetric weights ``L.weight_zero_point``
  int32 (⌈N·b/32⌉, G): the zero points offset the same way and packed down the columns.
- ``int-quantized`` (W8A8): ``L.weight`` int8 (N, K) signed, ``L.weight_scale`` (N, 1);
  activations int8 per token, dynamic.
- ``float-quantized`` (FP8): ``L.weight`` float8_e4m3fn (N, K), ``L.weight_scale`` (N, 1);
  activations e4m3 per token, dynamic.

What the format cannot hold is refused with the layer named: NF4 and other lookup-table
formats, per-tensor int weights with groups, act-order ``g_idx`` (compressed-tensors 0.19
no longer reads it: quantise with static groups), and groups that do not divide the
input features (the package rejects a ragged last group).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import pack, unpack
from lowbit.io.native import atomic_directory
from lowbit.io.shards import DEFAULT_MAX_SHARD_SIZE, load_tensors, parse_size, save_tensors
from lowbit.io.skeleton import build_model, float_tensors, layers_to_export, load_float_tensors, read_config
from lowbit.models import set_submodule
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

CT_VERSION = "0.19.0"  # the compressed-tensors release whose format this writes and reads
_SCALE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def is_compressed_tensors_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
        return qc.get("quant_method") == "compressed-tensors"
    except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object: not ours to claim
        return False


# -- scheme ↔ QuantizationArgs ----------------------------------------------------------------

def _weight_args(name: str, layer: QuantLinear) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(format, weight args, input-activation args) of one layer, or a LowbitError saying why not."""
    spec, act, w = layer.spec, layer.activations, layer.weight
    where = f"layer {name} ({spec.describe()})"
    if w.g_idx is not None:
        raise LowbitError(f"{where} has act-order g_idx, which compressed-tensors {CT_VERSION} does not read; "
                          "quantise with --static-groups to export it.")
    if spec.double_quant:
        raise LowbitError(f"{where}: double-quantised scales have no compressed-tensors form.")
    args: dict[str, Any] = {"num_bits": spec.bits, "symmetric": spec.symmetric, "dynamic": False,
                            "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    if spec.granularity == "group":
        group = w.group_size
        if layer.in_features % group:
            raise LowbitError(f"{where}: {layer.in_features} input features are not a multiple of the group size "
                              f"{group}, and compressed-tensors rejects a ragged last group.")
        args.update(strategy="group", group_size=group)
    elif spec.granularity == "channel":
        args.update(strategy="channel", group_size=None)
    else:
        raise LowbitError(f"{where}: per-{spec.granularity} weight scales have no compressed-tensors form here.")
    if spec.format == "int" and act is None:
        return "pack-quantized", {**args, "type": "int"}, None
    token = {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True, "group_size": None,
             "actorder": None, "observer": None, "observer_kwargs": {}}
    if (spec.format == "int" and spec.bits == 8 and spec.symmetric and act is not None
            and (act.format, act.bits, act.granularity) == ("int", 8, "token")):
        return "int-quantized", {**args, "type": "int"}, {**token, "type": "int"}
    if (spec.format == "fp8_e4m3" and act is not None
            and (act.format, act.granularity) == ("fp8_e4m3", "token")):
        return "float-quantized", {**args, "type": "float"}, {**token, "type": "float"}
    raise LowbitError(f"{where}{' with activations ' + act.describe() if act else ''} has no compressed-tensors "
                      "form (int weight-only, W8A8 per token, or FP8 e4m3 per token).")


def _spec_from_args(args: dict[str, Any], scale_dtype: torch.dtype, where: str) -> QuantSpec:
    kind, bits = args.get("type", "int"), int(args.get("num_bits", 0))
    strategy = args.get("strategy")
    if kind == "float" and bits == 8:
        fmt = "fp8_e4m3"
    elif kind == "int" and 2 <= bits <= 8:
        fmt = "int"
    else:
        raise LowbitError(f"{where}: {kind}{bits} weights are not a scheme lowbit runs.")
    if strategy == "group":
        granularity, group = "group", int(args["group_size"])
    elif strategy == "channel":
        granularity, group = "channel", None
    else:
        raise LowbitError(f"{where}: weight strategy {strategy!r} is not supported (group or channel).")
    if scale_dtype not in _SCALE_DTYPES:
        raise LowbitError(f"{where}: weight_scale has dtype {scale_dtype}, expected float16, bfloat16 or float32.")
    return QuantSpec(fmt, bits, granularity, group, symmetric=bool(args.get("symmetric", True)),
                     scale_dtype=_SCALE_DTYPES[scale_dtype])


# -- tensors ------------------------------------------------------------------------------------

def _words(qdata: torch.Tensor, n_words: int) -> torch.Tensor:
    """LSB-first bytes (R, B) → little-endian int32 words (R, n_words), zero-padded."""
    pad = 4 * n_words - qdata.shape[1]
    return torch.nn.functional.pad(qdata, (0, pad)).contiguous().view(torch.int32)


def _layer_tensors(name: str, layer: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    w = layer.weight
    rows, cols = w.shape
    scale = w.scale.reshape(w.scale_shape).contiguous()
    if fmt == "pack-quantized":
        bits = w.spec.bits
        out = {"weight_packed": _words(w.qdata, math.ceil(cols * bits / 32)), "weight_scale": scale,
               "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
        zeros = w.zero_points()  # (N, G) int32 codes, or None
        if zeros is not None:  # packed down the columns: one bit stream per group
            packed = pack(zeros.T.contiguous(), bits)  # (G, ⌈N·b/8⌉) uint8
            out["weight_zero_point"] = _words(packed, math.ceil(rows * bits / 32)).T.contiguous()
        return {f"{name}.{key}": t for key, t in out.items()}
    if fmt == "int-quantized":
        weight = (w.qdata.to(torch.int16) - 128).to(torch.int8)  # stored codes are offset by 128
    else:
        weight = w.qdata.view(torch.float8_e4m3fn)
    return {f"{name}.weight": weight.contiguous(), f"{name}.weight_scale": scale}


def _quantization_config(groups: dict[str, dict[str, Any]], formats: set[str], ignore: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "version": CT_VERSION,
    }
    return config


def save_compressed_tensors(model: nn.Module, out: str | Path, tokenizer: Any = None, overwrite: bool = False,
                            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a lowbit-quantised HF model as a compressed-tensors checkpoint in directory ``out``, in shards
    above ``max_shard_size`` (bytes, or a string such as "2GB")."""
    parse_size(max_shard_size)  # a bad size is refused before anything is written
    layers = layers_to_export(model, "compressed-tensors")
    groups: dict[str, dict[str, Any]] = {}
    by_key: dict[str, str] = {}
    formats: set[str] = set()
    layer_formats: dict[str, str] = {}
    for name, layer in layers.items():
        fmt, weights, inputs = _weight_args(name, layer)
        key = json.dumps([fmt, weights, inputs], sort_keys=True)
        if key not in by_key:
            by_key[key] = f"group_{len(by_key)}"
            groups[by_key[key]] = {"targets": [], "weights": weights, "input_activations": inputs,
                                   "output_activations": None, "format": fmt}
        groups[by_key[key]]["targets"].append(name)
        formats.add(fmt)
        layer_formats[name] = fmt
    quantized = {f"{name}.{buf}" for name, m in layers.items() for buf in m.buffer_keys()}
    quantized |= {f"{name}.bias" for name in layers}

    def units():  # one layer's compressed tensors at a time: made as the shard that holds them fills
        for name, layer in layers.items():
            unit = _layer_tensors(name, layer, layer_formats[name])
            if layer.bias is not None:
                unit[f"{name}.bias"] = layer.bias.detach().contiguous()
            yield unit
        yield from ({key: t} for key, t in float_tensors(model, quantized).items())

    if len(groups) == 1:  # one scheme for every quantised linear: target the class, name the rest
        only = next(iter(groups.values()))
        only["targets"] = ["Linear"]
        ignore = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    else:
        ignore = []
    qc = _quantization_config(groups, formats, ignore)
    with atomic_directory(out, overwrite) as tmp:
        config_dict = model.config.to_dict()
        config_dict["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        save_tensors(tmp, units(), max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


# -- import ---------------------------------------------------------------------------------------

def _targeted(name: str, module: nn.Module, targets: list[str]) -> bool:
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], name):
                return True
        elif target == name or target == type(module).__name__:
            return True
    return False


def _weight_from_ct(name: str, tensors: dict[str, torch.Tensor], fmt: str, spec: QuantSpec,
                    shape: tuple[int, int], file: Path) -> QuantizedWeight:
    rows, cols = shape

    def get(key: str) -> torch.Tensor:
        if f"{name}.{key}" not in tensors:
            raise LowbitError(f"tensor {name}.{key} is missing from '{file}'.")
        return tensors[f"{name}.{key}"]

    groups = -(-cols // spec.group_size) if spec.granularity == "group" else 1
    scale = get("weight_scale")
    if tuple(scale.shape) not in ((rows, groups),) + (((rows,),) if groups == 1 else ()):
        raise LowbitError(f"tensor {name}.weight_scale in '{file}' has shape {tuple(scale.shape)}, expected "
                          f"({rows}, {groups}).")
    scale = scale.reshape(rows, groups)
    found: dict[str, torch.Tensor] = {"scale": scale.contiguous()}
    if fmt == "pack-quantized":
        packed = get("weight_packed")
        if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, math.ceil(cols * spec.bits / 32)):
            raise LowbitError(f"tensor {name}.weight_packed in '{file}' is {packed.dtype} {tuple(packed.shape)}, "
                              f"expected int32 ({rows}, {math.ceil(cols * spec.bits / 32)}).")
        found["qdata"] = packed.contiguous().view(torch.uint8)[:, :math.ceil(cols * spec.bits / 8)].contiguous()
        if not spec.symmetric:
            zp = get("weight_zero_point")  # (⌈N·b/32⌉, G) int32, packed down the columns
            if zp.dtype != torch.int32 or tuple(zp.shape) != (math.ceil(rows * spec.bits / 32), groups):
                raise LowbitError(f"tensor {name}.weight_zero_point in '{file}' is {zp.dtype} {tuple(zp.shape)}, "
                                  f"expected int32 ({math.ceil(rows * spec.bits / 32)}, {groups}).")
            codes = unpack(zp.T.contiguous().view(torch.uint8), spec.bits, rows)  # (G, N)
            found["zero_point"] = pack(codes.T.contiguous(), spec.bits)
    else:
        weight = get("weight")
        want = torch.int8 if fmt == "int-quantized" else torch.float8_e4m3fn
        if weight.dtype != want or tuple(weight.shape) != shape:
            raise LowbitError(f"tensor {name}.weight in '{file}' is {weight.dtype} {tuple(weight.shape)}, "
                              f"expected {want} {shape}.")
        if fmt == "int-quantized":
            found["qdata"] = (weight.to(torch.int16) + 128).to(torch.uint8)
        else:
            found["qdata"] = weight.contiguous().view(torch.uint8)
    return QuantizedWeight.from_tensors(found, shape, spec, name=f"{file}:{name}")


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a compressed-tensors checkpoint (ours or a peer's: llm-compressor, …) as a lowbit model
    whose quantised linears are `QuantLinear` modules holding the stored codes unchanged (one file or
    shards with an index)."""
    path = Path(path)
    config = read_config(path)
    qc = getattr(config, "quantization_config", None) or {}
    if not isinstance(qc, dict):
        raise LowbitError(f"'{path / 'config.json'}': quantization_config is not a JSON object.")
    if qc.get("quant_method") != "compressed-tensors":
        raise LowbitError(f"'{path / 'config.json'}' has no compressed-tensors quantization_config.")
    if qc.get("quantization_status") not in (None, "compressed"):
        raise LowbitError(f"'{path}' is in status {qc.get('quantization_status')!r}; only compressed checkpoints "
                          "can be read.")
    stored = load_tensors(path)
    tensors = stored.tensors
    del config.quantization_config
    model = build_model(config, dtype, path)
    ignore = qc.get("ignore") or []
    taken: set[str] = set()
    for group_name, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        if fmt not in ("pack-quantized", "int-quantized", "float-quantized"):
            raise LowbitError(f"'{path / 'config.json'}': group {group_name} has format {fmt!r}, which lowbit does "
                              "not read (pack-quantized, int-quantized, float-quantized).")
        args = group.get("weights") or {}
        inputs = group.get("input_activations")
        act = None
        if inputs:
            if not inputs.get("dynamic") or inputs.get("strategy") != "token":
                raise LowbitError(f"'{path / 'config.json'}': group {group_name} has static or non-per-token "
                                  "activations, which lowbit does not run.")
            act = QuantSpec("int" if inputs.get("type") == "int" else "fp8_e4m3", 8, "token", dynamic=True,
                            scale_dtype="float32")
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or name in ignore or name in taken:
                continue
            if not _targeted(name, module, group.get("targets") or []):
                continue
            file = stored.file(f"{name}.weight_scale")
            where = f"'{file}': {name}"
            scale = tensors.get(f"{name}.weight_scale")
            if scale is None:
                raise LowbitError(f"tensor {name}.weight_scale is missing from '{file}'.")
            spec = _spec_from_args(args, scale.dtype, where)
            shape = (module.out_features, module.in_features)
            weight = _weight_from_ct(name, tensors, fmt, spec, shape, file)
            bias = tensors.get(f"{name}.bias")
            set_submodule(model, name, QuantLinear(weight, None if bias is None else bias.to(dtype), act))
            taken.add(name)
            for key in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight", "bias"):
                tensors.pop(f"{name}.{key}", None)
    if not taken:
        raise LowbitError(f"'{path / 'config.json'}' targets no linear layer of the model.")
    return load_float_tensors(model, tensors, taken, stored.where, dtype, stored.files)
