"""lowbit's native checkpoint: safetensors (never pickle) plus ``lowbit.json``.

A directory holds ``config.json`` (the float model's HF config), ``model.safetensors``
(packed codes, scales, zero points, and the float tensors left unquantised) — or, above
``max_shard_size``, shards ``model-0000i-of-0000N.safetensors`` with a
``model.safetensors.index.json``, each quantised layer's tensors in one shard (see
`lowbit.io.shards`) —, the tokenizer files when a tokenizer was given, and ``lowbit.json``:
the scheme, the method, the versions, and per quantised layer its shape, spec and bits per weight.

Writes are atomic: everything goes into a temporary sibling directory that is renamed
into place at the end, so an interrupted save leaves no half-written checkpoint.
Reads validate every tensor's presence, shape and dtype and name the one at fault.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.shards import DEFAULT_MAX_SHARD_SIZE, layer_units, load_tensors, parse_size, save_tensors
from lowbit.io.skeleton import build_model, read_config
from lowbit.models import set_submodule
from lowbit.nn import QuantLinear, checkpoint_layout, quantized_modules
from lowbit.nn.e8p_linear import E8PLinear, e8p_modules
from lowbit.nn.incoherent import IncoherentLinear, incoherent_modules
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

MANIFEST = "lowbit.json"
FORMAT_NAME = "lowbit-native"
FORMAT_VERSION = 1


def is_native_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _state_dict_without_aliases(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tied tensors stored once, and alias → stored-name for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def check_directory_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty ``out`` unless ``overwrite``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LowbitError(f"output directory '{out}' already exists and is not empty; choose another or overwrite it.")


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` when the block succeeds, removed
    when it fails, so an interrupted write never leaves a half-written checkpoint (nor touches the old one)."""
    out = Path(out)
    check_directory_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_native(model: nn.Module, out: str | Path, tokenizer: Any = None, info: dict[str, Any] | None = None,
                overwrite: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a quantised model to directory ``out`` atomically, in shards above ``max_shard_size`` (bytes,
    or a string such as "2GB"); returns the path."""
    out = Path(out)
    check_directory_target(out, overwrite)
    parse_size(max_shard_size)  # a bad size is refused before anything is written
    layers = {
        name: {
            "shape": [m.out_features, m.in_features],
            "weights": m.spec.to_dict(),
            "activations": m.activations.to_dict() if m.activations else None,
            "bias": m.bias is not None,
            "g_idx": m.has_g_idx,
            "bits_per_weight": m.bits_per_weight,
        }
        for name, m in quantized_modules(model).items()
    }
    tensors, aliases = _state_dict_without_aliases(model)
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": layers, "aliases": aliases,
                **_transform_entries(model), **(info or {})}
    config = getattr(model, "config", None)
    if config is None:
        raise LowbitError("only Hugging Face models (with a .config) can be saved in the native format.")
    with atomic_directory(out, overwrite) as tmp:
        config.to_json_file(tmp / "config.json")
        save_tensors(tmp, layer_units(tensors, layers), max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LowbitError(f"'{file}' is not a readable lowbit manifest ({err}).") from err
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise LowbitError(f"'{file}' is not a version-{FORMAT_VERSION} {FORMAT_NAME} manifest.")
    return manifest


def load_native(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a quantised model saved by `save_native` (one file or shards), validating every tensor."""
    path = Path(path)
    manifest = read_manifest(path)
    config = read_config(path)
    stored = load_tensors(path)
    state = stored.tensors

    model = build_model(config, dtype, path)
    _rebuild_transforms(model, manifest)
    for name, layer in manifest["layers"].items():
        shape = (int(layer["shape"][0]), int(layer["shape"][1]))
        spec = QuantSpec.from_dict(layer["weights"])
        act = QuantSpec.from_dict(layer["activations"]) if layer.get("activations") else None
        found = {key[len(name) + 1:]: t for key, t in state.items()
                 if key.startswith(name + ".") and key[len(name) + 1:] not in ("bias",)}
        file = stored.file(f"{name}.qdata")
        weight = QuantizedWeight.from_tensors(found, shape, spec, name=f"{file.name}:{name}")
        bias = state.get(f"{name}.bias")
        if layer.get("bias") and bias is None:
            raise LowbitError(f"tensor {name}.bias is missing from '{file}'.")
        set_submodule(model, name, QuantLinear(weight, bias, act, input_scale=found.get("input_scale")))
    for alias, target in manifest.get("aliases", {}).items():
        if target not in state:
            raise LowbitError(f"tensor {target} (stored for {alias}) is missing from '{stored.where}'.")
        state[alias] = state[target]
    with checkpoint_layout():  # keys, shapes and dtypes: act-order codes are not rebuilt for them
        expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        which = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        where = stored.where if missing else stored.file(unexpected[0])
        raise LowbitError(f"'{where}' does not match its config: {which}.")
    # the quantised layers were built from their tensors above (act-order codes sorted into group order there): they
    # are checked here with the rest, and neither converted nor assigned again; E8P layers are empty until assigned
    held = {f"{name}.{buf}" for name, m in quantized_modules(model).items() for buf in m.buffer_keys()}
    codebooks = {f"{name}.{buf}" for name, m in e8p_modules(model).items() for buf, _ in m.named_buffers(recurse=False)}
    for key, tensor in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise LowbitError(f"tensor {key} in '{stored.file(key)}' has shape {tuple(got.shape)}, "
                              f"expected {tuple(tensor.shape)}.")
        if got.is_floating_point() and tensor.is_floating_point() and key not in held and key not in codebooks:
            state[key] = got.to(dtype)
    model.load_state_dict({k: t for k, t in state.items() if k not in held}, strict=False, assign=True)
    model.tie_weights()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _transform_entries(model: nn.Module) -> dict[str, Any]:
    """Manifest entries for incoherence wrappers (`lowbit.nn.incoherent`) and E8P layers, when there are any:
    what `_rebuild_transforms` needs to make their modules before the state dict is loaded."""
    out: dict[str, Any] = {}
    wrappers = incoherent_modules(model)
    if wrappers:
        out["incoherent"] = {name: {"shape": [m.out_features, m.in_features], "bias": m.bias is not None,
                                    "seed": m.seed} for name, m in wrappers.items()}
    codebooks = e8p_modules(model)
    if codebooks:
        out["e8p_layers"] = {name: {"shape": [m.out_features, m.in_features], "bias": m.bias is not None,
                                    "bits_per_weight": 8.0 * m.weight.nbytes / (m.out_features * m.in_features)}
                             for name, m in codebooks.items()}
    return out


def _rebuild_transforms(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Replace the float linears that were saved wrapped (incoherence) or as E8P codes by empty modules of
    those kinds; loading the state dict then fills their buffers (and checks their shapes)."""
    try:
        for name, entry in manifest.get("incoherent", {}).items():
            rows, cols = int(entry["shape"][0]), int(entry["shape"][1])
            inner = nn.Linear(cols, rows, bias=False, device="meta")  # replaced by its quantised form below
            set_submodule(model, name, IncoherentLinear.empty(inner, cols, rows, bool(entry["bias"]),
                                                                entry.get("seed")))
        for name, entry in manifest.get("e8p_layers", {}).items():
            shape = (int(entry["shape"][0]), int(entry["shape"][1]))
            set_submodule(model, name, E8PLinear.empty(shape, bool(entry["bias"])))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LowbitError(f"the manifest's incoherence or E8P entries are malformed ({err}).") from err
