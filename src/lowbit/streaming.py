"""Quantise a checkpoint larger than memory: one decoder layer at a time, straight from its safetensors.

The model is built on the meta device from its config (`lowbit.io.skeleton.build_model`) and the
checkpoint's tensors stay memory-mapped in their files (`lowbit.io.shards.load_tensors`). The
embeddings are materialised for the calibration pass's first step only; then each decoder layer
in turn is given its float weights from the files, quantised by `lowbit.sequential.quantize_layerwise`
(or to nearest), written to a work directory beside the output, and returned to the meta device.
Peak memory is about one layer in float32, its calibration activations, and the statistics of its
largest linear — not the model.

The work directory (``.<out>.partial`` beside ``out``) holds ``run.json`` (what the run is: the
source's files with sizes and times, scheme, method, a digest of the calibration tokens, and the
next layer to do), one ``layer-NNNNN.safetensors`` per finished layer, and
``hidden-NNNNN.safetensors``: the calibration hidden states entering the next layer (the previous
layer's go once the progress is recorded). Each file is written to a temporary name and renamed,
``run.json`` last, so a run killed at any point resumes from the last finished layer
when the same command runs again: the saved hidden states are bit for bit those the uninterrupted
run would have had, so the checkpoint is bit-identical. A work directory left by a *different* run
(another source, scheme, method or calibration set) is refused, never mixed in. At the end the
native checkpoint is written atomically from the layer files and the untouched float tensors
(embeddings, final norm, output head — in the source's dtype), in shards of at most
`STREAM_SHARD_SIZE`, and the work directory removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import RTN, rtn_quantize
from lowbit.calibration.pipeline import LayerInputs
from lowbit.errors import LowbitError
from lowbit.io.native import FORMAT_NAME, FORMAT_VERSION, MANIFEST, atomic_directory, check_directory_target
from lowbit.io.shards import DEFAULT_MAX_SHARD_SIZE, layer_units, load_tensors, parse_size, save_tensors
from lowbit.io.skeleton import build_model, read_config, tied_output_key
from lowbit.memory import drop_file_pages, trim_heap
from lowbit.models import decoder_layers, output_embedding_name, select_linears, set_submodule
from lowbit.nn import QuantLinear, quantized_modules
from lowbit.scheme import Scheme, get_scheme

log = logging.getLogger(__name__)

RUN = "run.json"


def work_directory(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _fingerprint(source: Path, scheme: Scheme, method: Any, calib: Tensor | None) -> dict[str, Any]:
    files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".json"))
    digest = None
    if calib is not None:
        digest = hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        digest += f":{tuple(calib.shape)}"
    return {"source": str(source.resolve()),
            "files": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files},
            "scheme": scheme.to_dict(), "method": method.to_dict(), "calibration": digest}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    _write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                              metadata=metadata))


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged work file is named, not a traceback
        raise LowbitError(f"could not read '{path}' ({err}); remove the work directory '{path.parent}' to start "
                          "over.") from err


@dataclass
class _Run:
    """The work directory of one streaming run, and its progress."""

    work: Path
    fingerprint: dict[str, Any]
    next_layer: int = 0

    @classmethod
    def open(cls, work: Path, fingerprint: dict[str, Any]) -> _Run:
        file = work / RUN
        if not file.is_file():
            work.mkdir(parents=True, exist_ok=True)
            run = cls(work, fingerprint)
            run.save()
            return run
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LowbitError(f"'{file}' is not readable ({err}); remove '{work}' to start over.") from err
        if saved.get("fingerprint") != fingerprint:
            raise LowbitError(f"'{work}' holds an unfinished run of another source, scheme, method or calibration "
                              "set; remove it, or re-run that command to finish it.")
        return cls(work, fingerprint, int(saved["next_layer"]))

    def save(self) -> None:
        text = json.dumps({"fingerprint": self.fingerprint, "next_layer": self.next_layer}, indent=1) + "\n"
        _write_atomic(self.work / RUN, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def layer_file(self, index: int) -> Path:
        return self.work / f"layer-{index:05d}.safetensors"

    def hidden_file(self, index: int) -> Path:
        """The calibration hidden states entering layer ``index``."""
        return self.work / f"hidden-{index:05d}.safetensors"


class _Stream:
    """`lowbit.sequential.LayerStream` over a checkpoint's memory-mapped tensors and a work directory."""

    def __init__(self, run: _Run, stored: dict[str, Tensor], prefix: str, dtype: torch.dtype, model: nn.Module) -> None:
        self.run, self.stored, self.prefix, self.dtype, self.model = run, stored, prefix, dtype, model
        self.start = run.next_layer

    def resume(self, inputs: LayerInputs, probe: LayerInputs) -> tuple[LayerInputs, LayerInputs]:
        # the calibration inputs are captured: the embeddings go back to meta (a 7B model's: 0.5 GB)
        holders = [self.prefix[:-1].rpartition(".")[0]]  # the layers' owner and its owners hold the layers too
        while holders[-1]:
            holders.append(holders[-1].rpartition(".")[0])
        for name, module in self.model.named_modules():
            if name not in holders and not name.startswith(self.prefix):
                module.to("meta")
        trim_heap()
        if self.start == 0:
            return inputs, probe
        saved = _load_safetensors(self.run.hidden_file(self.start))
        hidden = [saved[f"inputs.{i}"] for i in range(len(inputs.hidden))]
        return LayerInputs(hidden, inputs.kwargs), LayerInputs([saved["probe.0"]], probe.kwargs)

    def load(self, index: int, layer: nn.Module) -> None:
        load_layer(layer, self.stored, f"{self.prefix}{index}.", self.dtype)

    def done(self, index: int, layer: nn.Module, outputs: LayerInputs, probe: LayerInputs) -> None:
        self.run.next_layer = index + 1
        finish_layer(self.run, index, layer, self.prefix, self.stored,
                     {**{f"inputs.{i}": h for i, h in enumerate(outputs.hidden)}, "probe.0": probe.hidden[0]})


def load_layer(layer: nn.Module, stored: dict[str, Tensor], prefix: str, dtype: torch.dtype,
               only: set[str] | None = None) -> None:
    """Assign the layer its float tensors (or those named in ``only``) from the checkpoint, in ``dtype``; a
    tensor the layer expects that the checkpoint lacks, or one of another shape, is a LowbitError naming it."""
    state = {}
    for key, expected in layer.state_dict().items():
        if only is not None and key not in only:
            continue
        full = prefix + key
        if full not in stored:
            raise LowbitError(f"tensor {full} is missing from the checkpoint.")
        tensor = stored[full]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise LowbitError(f"tensor {full} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}.")
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    layer.load_state_dict(state, strict=only is None, assign=True)
    for param in layer.parameters():
        param.requires_grad_(False)


def finish_layer(run: _Run, index: int, layer: nn.Module, prefix: str, stored: dict[str, Tensor],
                 hidden: dict[str, Tensor] | None) -> None:
    """Write layer ``index`` (and the next layer's calibration inputs) to the work directory, record the
    progress, return the layer to the meta device and the pages of its float tensors to their files."""
    local = quantized_modules(layer)
    quantized = {f"{prefix}{index}.{n}": m for n, m in local.items()}
    codes = {f"{n}.{k}" for n, m in local.items() for k in m.kernel_weight.tensors()}
    # float tensors other than the packed weights in float32, as the in-memory path (which loads float32) writes them
    tensors = {f"{prefix}{index}.{k}": v.float() if v.is_floating_point() and k not in codes else v
               for k, v in layer.state_dict().items()}
    records = {name: _layer_record(m) for name, m in quantized.items()}
    _save_safetensors(run.layer_file(index), tensors, {"lowbit.layers": json.dumps(records)})
    if hidden is not None:
        _save_safetensors(run.hidden_file(index + 1), hidden)
    run.save()  # last: a run killed before this line redoes layer ``index``
    run.hidden_file(index).unlink(missing_ok=True)
    layer.to("meta")
    for key, tensor in stored.items():  # mapped from the checkpoint: resident until dropped
        if key.startswith(f"{prefix}{index}."):
            drop_file_pages(tensor)
    trim_heap()


def _layer_record(m: QuantLinear) -> dict[str, Any]:
    return {"shape": [m.out_features, m.in_features], "weights": m.spec.to_dict(),
            "activations": m.activations.to_dict() if m.activations else None, "bias": m.bias is not None,
            "g_idx": m.has_g_idx, "bits_per_weight": m.bits_per_weight}


def _round_layer(layer: nn.Module, stored: dict[str, Tensor], selected: set[str], prefix: str, scheme: Scheme) -> None:
    """Round to nearest the selected linears of a layer, one weight in float32 at a time (the rest of the layer,
    norms and unselected linears, gets its tensors as they are)."""
    names = [local for local, m in layer.named_modules() if prefix + local in selected and isinstance(m, nn.Linear)]
    for local in names:  # by name: no list holds a float32 linear once it is replaced
        full, linear = prefix + local, layer.get_submodule(local)
        load_layer(linear, stored, f"{full}.", torch.float32)  # this linear's weight (and bias) alone
        weight = rtn_quantize(linear.weight, scheme.spec_for(full), name=f"{full}.weight")
        set_submodule(layer, local, QuantLinear(weight, linear.bias, scheme.activations))
        del linear
        drop_file_pages(stored[f"{full}.weight"])
        trim_heap()
    rest = {k for k, t in layer.state_dict().items() if t.is_meta}
    if rest:
        load_layer(layer, stored, prefix, torch.float32, only=rest)


def streaming_source(model: str | os.PathLike[str] | None) -> Path:
    """The safetensors checkpoint directory to stream from: a HF directory, or for a GGUF source (the
    default model among them) its converted safetensors cache."""
    from lowbit.models.loading import _ensure_gguf_cache, resolve_source

    source = resolve_source(model)
    if source.gguf_file is None:
        directory = source.directory
    else:
        cached = _ensure_gguf_cache(source)
        if cached is None:
            raise LowbitError(f"streaming reads safetensors; '{source.label}' is GGUF and its safetensors cache "
                              "could not be written.")
        directory = cached
    if not (directory / "config.json").is_file():
        raise LowbitError(f"'{directory}' has no config.json; streaming needs a Hugging Face checkpoint directory.")
    return directory


def quantize_streaming(model: str | os.PathLike[str] | None, out: str | os.PathLike[str], scheme: Scheme | str,
                       method: Any = None, calib: Tensor | None = None, *, overwrite: bool = False,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
                       batch_size: int | None = None) -> Path:
    """Quantise the checkpoint ``model`` (a directory of safetensors, or a GGUF file via its safetensors
    cache) into the native checkpoint ``out``, one decoder layer in memory at a time; resumes an
    interrupted run of the same command. Returns ``out``."""
    from lowbit.api import check_method
    from lowbit.sequential import quantize_layerwise

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    method = RTN() if method is None else method
    check_method(scheme, method, calib is not None)
    if scheme.lm_head is not None:
        raise LowbitError(f"streaming quantises decoder layers only; scheme {scheme.name} also quantises lm_head.")
    out = Path(out)
    check_directory_target(out, overwrite)
    parse_size(max_shard_size)
    source = streaming_source(model)
    config = read_config(source)
    stored = load_tensors(source)
    skeleton = build_model(config, torch.float32, source)
    prefix, layers = decoder_layers(skeleton)
    prefix += "."
    run = _Run.open(work_directory(out), _fingerprint(source, scheme, method, calib))
    if run.next_layer:
        log.info("resuming %s at layer %d of %d", out, run.next_layer, len(layers))
    selected = set(select_linears(skeleton, scheme.targets, scheme.ignore))
    outside = sorted(n for n in selected if not n.startswith(prefix))
    if outside:
        raise LowbitError(f"streaming quantises decoder layers only; {outside[0]} is outside them (exclude it).")
    if run.next_layer < len(layers):
        if getattr(method, "needs_calibration", False):
            _materialise_outside_layers(skeleton, stored.tensors, prefix, torch.float32)
            dtype = _layer_dtype(method, stored.tensors, prefix)
            quantize_layerwise(skeleton, scheme, method, calib, batch_size, progress,
                               stream=_Stream(run, stored.tensors, prefix, dtype, skeleton))
        else:
            bar = tqdm(range(run.next_layer, len(layers)), desc=f"{method.name} {scheme.name}", unit="layer",
                       disable=None if progress else True)
            for i in bar:
                _round_layer(layers[i], stored.tensors, selected, f"{prefix}{i}.", scheme)
                run.next_layer = i + 1
                finish_layer(run, i, layers[i], prefix, stored.tensors, None)
    del skeleton, layers
    trim_heap()
    info = {"scheme": scheme.to_dict(), "method": method.to_dict(), "source": str(source), "streamed": True}
    _assemble(source, out, run, stored.tensors, prefix, config, info, overwrite, max_shard_size)
    shutil.rmtree(run.work, ignore_errors=True)
    return out


def _layer_dtype(method: Any, stored: dict[str, Tensor], prefix: str) -> torch.dtype:
    """bfloat16 when the checkpoint's layers are bfloat16 and plain GPTQ calibrates in bfloat16 anyway: the layers
    then run on the mapped tensors themselves (no float32 copy: 0.8 GB less for a 7B layer) and GPTQ widens
    each weight to float32 for its solve, exactly as from a float32 copy. Otherwise float32, as in memory."""
    from lowbit.algorithms.gptq import GPTQ
    from lowbit.sequential import calibration_dtype

    layer_dtypes = {t.dtype for k, t in stored.items() if k.startswith(prefix) and t.is_floating_point()}
    if (isinstance(method, GPTQ) and layer_dtypes == {torch.bfloat16}
            and calibration_dtype(method.calib_dtype, torch.device("cpu")) == torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def _materialise_outside_layers(model: nn.Module, stored: dict[str, Tensor], prefix: str, dtype: torch.dtype) -> None:
    """The tensors outside the decoder layers that the calibration pass runs through (embeddings, rotary
    buffers are real already), from the checkpoint; the output head stays on meta when it is not tied."""
    tied = tied_output_key(model)
    name = None if tied else output_embedding_name(model)
    head = None if name is None else f"{name}.weight"
    state = {k: stored[k].to(dtype) for k, t in model.state_dict().items()
             if not k.startswith(prefix) and k != head and k != tied and t.is_meta and k in stored}
    model.load_state_dict(state, strict=False, assign=True)
    for key in state:  # the copies are made: the mapped pages they were read from leave this process (0.26 GB at 7B)
        drop_file_pages(stored[key])


def _assemble(source: Path, out: Path, run: _Run, stored: dict[str, Tensor], prefix: str, config, info: dict[str, Any],
              overwrite: bool, max_shard_size: int | str) -> None:
    """The native checkpoint from the layer files and the source's other tensors, written atomically. The
    layer files are read one at a time as the shards fill, and a shard is at most `STREAM_SHARD_SIZE`: what
    the writer holds is one shard, not the model."""
    from safetensors import safe_open

    count = 0
    layers: dict[str, Any] = {}
    while run.layer_file(count).is_file():
        with safe_open(str(run.layer_file(count)), "pt") as f:
            layers.update(json.loads(f.metadata()["lowbit.layers"]))
        count += 1
    if count != run.next_layer:
        raise LowbitError(f"'{run.work}' holds {count} layer files but records {run.next_layer} finished layers; "
                          "remove it to start over.")
    skeleton = build_model(config, torch.float32, source)
    aliases = {}
    tied = tied_output_key(skeleton)
    if tied is not None and tied not in stored:
        aliases[tied] = next(f"{n}.weight" for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings())
    outside = {k: t for k, t in stored.items() if not k.startswith(prefix)}
    missing = sorted(k for k in skeleton.state_dict() if not k.startswith(prefix) and k not in outside
                     and k not in aliases)
    if missing:
        raise LowbitError(f"the checkpoint '{source}' lacks tensor {missing[0]}.")
    del skeleton

    def units():
        for index in range(count):
            yield from layer_units(_load_safetensors(run.layer_file(index)), layers)
        for key, tensor in outside.items():
            yield {key: tensor}

    limit = min(parse_size(max_shard_size), parse_size(STREAM_SHARD_SIZE))
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": layers, "aliases": aliases, **info}
    with atomic_directory(out, overwrite) as tmp:
        config.to_json_file(tmp / "config.json")
        save_tensors(tmp, units(), limit)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja"):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


STREAM_SHARD_SIZE = "1GB"  # the largest shard a streamed checkpoint gets: the writer holds one shard


__all__ = ["quantize_streaming", "streaming_source", "work_directory"]
