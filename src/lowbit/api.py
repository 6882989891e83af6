"""The public, one-call API: load, quantise, evaluate, save.

```python
import lowbit
model = lowbit.load_model()                        # the embedded default model
q = lowbit.quantize(model, lowbit.W4A16)           # round-to-nearest by default
print(lowbit.evaluate(q, reference=model, text="pydoc-eval"))
lowbit.save(q, "out/")
```
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import distributed
from lowbit.algorithms import AWQ, GPTQ, RTN, SmoothQuant, rtn_quantize
from lowbit.calibration import load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.eval.metrics import EvalConfig, ReferenceStats, TextResult, evaluate_tokens
from lowbit.footprint import Footprint, model_footprint
from lowbit.io import (
    check_directory_target,
    check_file_target,
    gguf_target,
    is_compressed_tensors_checkpoint,
    is_gptq_checkpoint,
    is_native_checkpoint,
    load_compressed_tensors,
    load_gptq,
    load_native,
    read_manifest,
    save_compressed_tensors,
    save_gguf,
    save_gptq,
    save_native,
)
from lowbit.io.shards import DEFAULT_MAX_SHARD_SIZE
from lowbit.models import (load_pretrained, load_pretrained_tokenizer, output_embedding_name, select_linears,
                           set_submodule)
from lowbit.nn import QuantLinear, use_float_gemv
from lowbit.planner import BitPlan
from lowbit.scheme import QuantSpec, Scheme, get_scheme
from lowbit.sequential import quantize_layerwise

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class QuantInfo:
    """What was done to a model: attached to it as ``model.lowbit_info`` and saved with it."""

    scheme: Scheme
    method: dict[str, Any]
    seconds: float
    source: str = "unknown"
    details: dict[str, Any] = field(default_factory=dict)  # per-layer errors, fallbacks, …

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme.to_dict(), "method": self.method, "quantize_seconds": self.seconds,
                "model": self.source, "details": self.details}


FORMATS = ("native", "compressed-tensors", "gptq", "gguf")


def checkpoint_format(path: PathLike | None) -> str | None:
    """Which quantised-checkpoint format directory ``path`` holds (one of `FORMATS`), or None."""
    if path in (None, "", "default") or not Path(path).is_dir():  # type: ignore[arg-type]
        return None
    if is_native_checkpoint(path):  # type: ignore[arg-type]
        return "native"
    if is_gptq_checkpoint(path):  # type: ignore[arg-type]
        return "gptq"
    if is_compressed_tensors_checkpoint(path):  # type: ignore[arg-type]
        return "compressed-tensors"
    return None


def load_model(path: PathLike | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from a HF directory, a GGUF file, a quantised checkpoint (lowbit's native, compressed-tensors
    or GPTQ), or the default (None)."""
    fmt = checkpoint_format(path)
    if fmt is not None:
        return load(path, dtype=dtype)  # type: ignore[arg-type]
    model = load_pretrained(path, dtype=dtype)
    model.lowbit_source = "default" if path in (None, "", "default") else str(path)
    return model


def load_tokenizer(path: PathLike | None = None):  # -> PreTrainedTokenizerBase
    """The tokenizer that belongs to `load_model` of the same argument."""
    fmt = checkpoint_format(path)
    if fmt is not None:
        if (Path(path) / "tokenizer_config.json").is_file():  # type: ignore[arg-type]
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        if fmt != "native":
            raise LowbitError(f"'{path}' holds no tokenizer files (tokenizer_config.json); save the tokenizer "
                              "beside the checkpoint.")
        source = read_manifest(path).get("model")  # type: ignore[arg-type]
        return load_pretrained_tokenizer(None if source in (None, "default") else source)
    return load_pretrained_tokenizer(path)


def quantize(model: nn.Module, scheme: Scheme | BitPlan | str, method: Any = None,
             calib: torch.Tensor | None = None, inplace: bool = False, progress: bool = True) -> nn.Module:
    """Quantise the linear layers the scheme selects; returns the quantised model.

    The input model is left untouched unless ``inplace``. ``method`` defaults to RTN.
    ``calib`` (a (n, seqlen) token tensor) is for methods that need calibration data.
    ``scheme`` may be a `lowbit.planner.BitPlan` (mixed bits per module); the plan is then
    kept in ``lowbit_info.details["bit_plan"]``, and so in a native checkpoint.
    """
    plan = scheme if isinstance(scheme, BitPlan) else None
    scheme = plan.scheme if plan is not None else get_scheme(scheme) if isinstance(scheme, str) else scheme
    method = RTN() if method is None else method
    check_method(scheme, method, calib is not None)
    target = model if inplace else copy.deepcopy(model)
    linears = select_linears(target, scheme.targets, scheme.ignore)
    if not linears:
        raise LowbitError(f"scheme {scheme.name} selects no linear layer of {type(model).__name__}.")
    head = output_projection(target, scheme) if scheme.lm_head is not None else None
    if head is not None and head in linears:
        raise LowbitError(f"scheme {scheme.name} selects {head} among its linear layers and also sets lm_head; "
                          "leave it in ignore or drop the lm_head setting.")
    start = time.perf_counter()
    details: dict[str, Any] = {}
    if not isinstance(method, RTN):
        distributed.init_from_environment()  # under torchrun: calibration split across the ranks
        del linears  # each float linear goes once its layer is done: hold none of them here
        details = quantize_layerwise(target, scheme, method, calib, progress=progress).to_dict()  # type: ignore[arg-type]
    else:
        for name, linear in tqdm(linears.items(), desc=f"{method.name} {scheme.name}", unit="layer",
                                 disable=None if progress else True, leave=False):
            qweight = rtn_quantize(linear.weight.detach(), scheme.spec_for(name), name=f"{name}.weight")
            set_submodule(target, name, QuantLinear(qweight, linear.bias, scheme.activations))
    if head is not None:
        quantize_output_projection(target, head, scheme.lm_head)  # type: ignore[arg-type]
    use_float_gemv(target)  # the layers left in float (the tied head above all): lowbit's GEMV when decoding on CPU
    seconds = time.perf_counter() - start
    if plan is not None:
        details["bit_plan"] = plan.to_dict(scheme=False)  # the scheme is the info's own: kept once, beside it
    target.lowbit_info = QuantInfo(scheme, method.to_dict(), seconds, getattr(model, "lowbit_source", "unknown"),
                                   details)
    return target


def output_projection(model: nn.Module, scheme: Scheme) -> str:
    """The module name of ``model``'s output projection (``lm_head``), which ``scheme`` quantises; or one
    LowbitError saying why it cannot."""
    name = output_embedding_name(model)
    if name is None or not isinstance(model.get_submodule(name), nn.Linear):
        raise LowbitError(f"scheme {scheme.name} quantises lm_head, but {type(model).__name__} has no linear "
                          "output projection (get_output_embeddings) to quantise.")
    return name


def quantize_output_projection(model: nn.Module, name: str, spec: QuantSpec) -> None:
    """Round the output projection ``name`` of ``model`` to ``spec`` (weight-only: its input is the final
    hidden state, whose float precision matters most). A head tied to the input embedding is untied: the
    embedding keeps the float weight and the config says so, so that checkpoints are loaded untied."""
    head = model.get_submodule(name)
    qweight = rtn_quantize(head.weight.detach(), spec, name=f"{name}.weight")
    set_submodule(model, name, QuantLinear(qweight, head.bias, None))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def check_method(scheme: Scheme, method: Any, has_calibration: bool) -> None:
    """Refuse, in one sentence, a method that cannot quantise ``scheme`` (before any work is done)."""
    if not isinstance(method, (RTN, GPTQ, AWQ, SmoothQuant)):
        raise LowbitError(f"method {getattr(method, 'name', method)!r} is not available; use RTN(), GPTQ(), AWQ() "
                          "or SmoothQuant().")
    label = "+".join({"awq": "AWQ", "gptq": "GPTQ", "smoothquant": "SmoothQuant", "rtn": "RTN"}[part]
                     for part in method.to_dict()["name"].split("+"))
    uses_gptq = isinstance(method, GPTQ) or getattr(method, "gptq", None) is not None
    if scheme.per_module and not isinstance(method, (RTN, GPTQ)):
        raise LowbitError(f"a mixed scheme (bits per module, {scheme.name}) is quantised with RTN or GPTQ, "
                          f"not {label}.")
    if (uses_gptq or isinstance(method, AWQ)) and scheme.weights.format != "int":
        raise LowbitError(f"{label} quantises integer weights; scheme {scheme.name} uses {scheme.weights.format}.")
    if isinstance(method, AWQ) and scheme.activations is not None:
        raise LowbitError(f"AWQ protects weight-only schemes; scheme {scheme.name} also quantises activations "
                          "(use SmoothQuant).")
    if isinstance(method, SmoothQuant) and scheme.activations is None:
        raise LowbitError(f"SmoothQuant smooths activations for W8A8 / FP8 schemes; scheme {scheme.name} leaves them "
                          "in float (use AWQ).")
    if scheme.activations is not None and not scheme.activations.dynamic and not isinstance(method, SmoothQuant):
        raise LowbitError(f"scheme {scheme.name} has static activation scales, which are calibrated by SmoothQuant "
                          "(method smoothquant or smoothquant+gptq).")
    if not isinstance(method, RTN) and not has_calibration:
        raise LowbitError(f"{label} needs calibration data: pass calib=lowbit.calibration_set(...).")


@dataclass
class EvalReport:
    """Per-text results of one model, and its weight footprint."""

    results: dict[str, TextResult]
    footprint: Footprint
    config: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.footprint.to_dict(),
                               "ppl": {k: r.ppl for k, r in self.results.items()},
                               "eval": {k: r.to_dict() for k, r in self.results.items()},
                               "eval_config": vars(self.config).copy()}
        if any(r.reference_ppl is not None for r in self.results.values()):
            out["reference_ppl"] = {k: r.reference_ppl for k, r in self.results.items()}
            first = next(iter(self.results.values()))
            out["kl"], out["top1"] = first.kl, first.top1
            out["kl_per_text"] = {k: r.kl for k, r in self.results.items()}
            out["top1_per_text"] = {k: r.top1 for k, r in self.results.items()}
        return out

    def __str__(self) -> str:
        lines = []
        for text, r in self.results.items():
            line = f"{text}: ppl {r.ppl:.4f}"
            if r.reference_ppl is not None:
                line += f" (reference {r.reference_ppl:.4f})"
            if r.kl is not None:
                line += f", KL {r.kl:.5f}, top-1 {r.top1:.2f}%"
            lines.append(line)
        bpw = self.footprint.bits_per_weight
        lines.append(f"weights {self.footprint.total_bytes / 1e6:.1f} MB"
                     + (f", {bpw:.3f} bits per quantised weight" if bpw else ""))
        return "\n".join(lines)


def evaluate(model: nn.Module, reference: nn.Module | dict[str, ReferenceStats] | None = None,
             text: str | list[str] = "pydoc-eval", tokenizer: Any = None,
             config: EvalConfig = EvalConfig(), progress: bool = True) -> EvalReport:
    """Perplexity per text, and KL / top-1 against ``reference`` (a model, or cached stats per text)."""
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise LowbitError("evaluation needs at least one text source.")
    if tokenizer is None:
        tokenizer = load_tokenizer(None)
    results = {}
    for name in texts:
        tokens = tokenize(tokenizer, load_text(name))
        ref = reference.get(name) if isinstance(reference, dict) else reference
        results[name] = evaluate_tokens(model, tokens, ref, config, desc=f"eval {name}", progress=progress)
    return EvalReport(results, model_footprint(model), config)


def check_output(out: PathLike, format: str, overwrite: bool = False) -> None:
    """Refuse, before any work, an ``out`` that `save` in ``format`` would refuse as already there."""
    if format == "gguf":
        check_file_target(gguf_target(out), overwrite)
    else:
        check_directory_target(Path(out), overwrite)


def save(model: nn.Module, out: PathLike, format: str = "native", tokenizer: Any = None,
         overwrite: bool = False, gguf_type: str | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a quantised model to directory ``out`` in ``format``: 'native' (lowbit's safetensors + JSON
    layout, any scheme), 'compressed-tensors' (vLLM, transformers), 'gptq' (GPTQ v1) or 'gguf' (llama.cpp:
    one file, ``out`` itself when it ends in .gguf, else ``out/model.gguf``; float linears as ``gguf_type``,
    see `lowbit.io.gguf`). The safetensors formats write one file, or above ``max_shard_size`` (bytes, or
    e.g. "2GB"; 5 GB by default) shards with an index. Under torchrun only rank 0 writes (the others hold
    the same model, see `lowbit.distributed`)."""
    if distributed.rank() != 0:
        return Path(out)
    if format == "gguf":
        return save_gguf(model, out, tokenizer=tokenizer, gguf_type=gguf_type, overwrite=overwrite)
    if gguf_type is not None:
        raise LowbitError(f"gguf_type applies to format 'gguf', not {format!r}.")
    if format == "native":
        info = model.lowbit_info.to_dict() if isinstance(getattr(model, "lowbit_info", None), QuantInfo) else {}
        return save_native(model, out, tokenizer=tokenizer, info=info, overwrite=overwrite,
                           max_shard_size=max_shard_size)
    if format == "compressed-tensors":
        return save_compressed_tensors(model, out, tokenizer=tokenizer, overwrite=overwrite,
                                       max_shard_size=max_shard_size)
    if format == "gptq":
        return save_gptq(model, out, tokenizer=tokenizer, overwrite=overwrite, max_shard_size=max_shard_size)
    raise LowbitError(f"format {format!r} is not one of {', '.join(FORMATS)}.")


def load(path: PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a quantised checkpoint directory: lowbit's native format, compressed-tensors or GPTQ v1."""
    fmt = checkpoint_format(path)
    loaders = {"native": load_native, "compressed-tensors": load_compressed_tensors, "gptq": load_gptq}
    if fmt in loaders:
        try:
            model = loaders[fmt](path, dtype=dtype)
        except LowbitError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            # The readers check what a damaged file usually gets wrong; anything else they trip on is
            # still the file's fault, and still one sentence.
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LowbitError(f"'{path}' is not a valid {fmt} checkpoint ({type(err).__name__}: {first}).") from err
        use_float_gemv(model)  # as `quantize` leaves it
        return model
    if Path(path).suffix.lower() == ".gguf" and Path(path).is_file():  # llama.cpp's format: read as a float model
        return load_model(path, dtype=dtype)
    raise LowbitError(f"'{path}' is not a quantised checkpoint lowbit reads (no lowbit.json, no gptq "
                      "quantize_config.json, no compressed-tensors quantization_config in config.json).")
