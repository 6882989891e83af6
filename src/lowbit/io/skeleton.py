"""What the exporters and importers of other formats share: the quantised layers of a model to export and
its float tensors stored once, and, on import, loading the remaining float tensors into the model
skeleton, checked one by one, and tying the embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.layers import output_embedding_name
from lowbit.nn import QuantLinear, checkpoint_layout, quantized_modules


def check_exportable(model: nn.Module, fmt: str) -> None:
    """A LowbitError if ``model`` holds modules that compute more than a linear on stored weights (Hadamard
    transforms, E8P codes): ``fmt`` would keep their inner layers and lose the rest, a checkpoint that loads
    and computes something else."""
    from lowbit.nn.e8p_linear import E8PLinear
    from lowbit.nn.incoherent import IncoherentLinear
    from lowbit.rotation import OnlineHadamard

    kinds = (IncoherentLinear, E8PLinear, OnlineHadamard)
    beyond = next((n for n, m in model.named_modules() if isinstance(m, kinds)), None)
    if beyond is not None:
        raise LowbitError(f"{beyond} is an incoherence-processed, E8P or rotation module, which {fmt} cannot "
                          "express; save this model in the native format.")


def layers_to_export(model: nn.Module, fmt: str) -> dict[str, QuantLinear]:
    """The quantised layers of an HF model, or a LowbitError saying why it cannot be written as ``fmt``."""
    if getattr(model, "config", None) is None:
        raise LowbitError(f"only Hugging Face models (with a .config) can be exported to {fmt}.")
    check_exportable(model, fmt)
    layers = quantized_modules(model)
    if not layers:
        raise LowbitError("the model has no quantised layers to export.")
    return layers


def float_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's state dict without the keys in ``skip``, tied tensors (embeddings / lm_head) once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    with checkpoint_layout():  # the quantised layers' tensors are skipped: none is rebuilt for it
        state = model.state_dict()
    for key, tensor in state.items():
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if key in skip or (tensor.numel() and ptr in seen):
            continue
        seen.add(ptr)
        out[key] = tensor.detach().contiguous().cpu()
    return out


def read_config(path: Path):  # -> transformers.PretrainedConfig
    """The HF config of checkpoint directory ``path``, or one LowbitError naming the file."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; give one sentence
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LowbitError(f"could not read '{path / 'config.json'}': {first}") from err


def build_model(config, dtype: torch.dtype, path: Path) -> nn.Module:
    """The model ``config`` describes with its parameters on the meta device (no float weight is ever
    allocated: the loaders assign the checkpoint's tensors), buffers such as rotary tables real; or one
    LowbitError naming the config that cannot be built."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - a config transformers accepts can still fail to build
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LowbitError(f"'{path / 'config.json'}' describes a model that cannot be built "
                          f"({type(err).__name__}: {first}).") from err


def json_object(text: str, file: Path) -> dict:
    """A JSON object from ``text`` (a file's contents), or one LowbitError naming the file."""
    import json

    try:
        data = json.loads(text)
    except ValueError as err:
        raise LowbitError(f"'{file}' is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise LowbitError(f"'{file}' does not hold a JSON object.")
    return data


def tied_output_key(model: nn.Module) -> str | None:
    """State-dict key of the output embedding when it is tied to the input one (checkpoints store it once)."""
    name = output_embedding_name(model) if getattr(model.config, "tie_word_embeddings", False) else None
    return None if name is None else f"{name}.weight"


def load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: list[str] | set[str],
                       where: str | Path, dtype: torch.dtype, files: dict[str, Path] | None = None) -> nn.Module:
    """Assign ``tensors`` (every float tensor of the checkpoint, the quantised layers' removed) to the
    model, after checking that they are exactly the ones it expects, in the shapes it expects. Errors
    name ``where`` (the checkpoint's file or index), or the tensor's own file when ``files`` gives it."""
    files = files or {}
    with checkpoint_layout():
        state = model.state_dict()
    expected = {k: t for k, t in state.items() if not any(k.startswith(n + ".") for n in quantized)}
    tied = tied_output_key(model)
    missing = sorted(k for k in set(expected) - set(tensors) if k != tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        which = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LowbitError(f"'{where if missing else files.get(unexpected[0], where)}' does not match its config: "
                          f"{which}.")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LowbitError(f"tensor {key} in '{files.get(key, where)}' has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(expected[key].shape)}.")
    model.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()},
                          strict=False, assign=True)
    model.tie_weights()
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise LowbitError(f"'{where}' leaves {empty[0]} without a value.")
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
