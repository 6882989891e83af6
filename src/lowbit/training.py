"""Quantisation-aware training and QLoRA: prepare a model, train it, convert it (the shell around
`lowbit.algorithms.qat`).

```python
import lowbit
model = lowbit.load_model()
student = lowbit.prepare_qat(model, lowbit.W3A16, init=lowbit.GPTQ(), calib=lowbit.calibration_set())
report = lowbit.train_qat(student, lowbit.load_text("pydoc-calib"), lowbit.QAT(steps=200), teacher=model,
                          checkpoint_dir="qat-run/")
quantized = lowbit.convert(student)            # QuantLinear with packed codes, equal to the fake-quant model
```

Checkpoints (``checkpoint_dir/checkpoint/``, replaced atomically) hold the trained modules'
parameters and buffers, the optimiser's state and the loss curve in safetensors + JSON (no
pickle); each step's windows depend only on the seed and the step number, so a resumed run
repeats the uninterrupted one's loss curve. A loss or gradient that stops being finite ends
training with one sentence, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms import RTN
from lowbit.algorithms.qat import QAT, distillation_loss, lr_factor, next_token_loss, window_starts
from lowbit.errors import LowbitError
from lowbit.memory import peak_rss_bytes
from lowbit.models import select_linears, set_submodule
from lowbit.nn import (FakeQuantLinear, LoRALinear, fake_quant_modules, lora_modules, quantized_modules,
                       use_float_gemv)
from lowbit.scheme import NF4, Scheme, get_scheme

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
TRAINER_FILE = "trainer.json"
MODULES_FILE = "modules.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


# -- preparing and converting ---------------------------------------------------------------------

def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def prepare_qat(model: nn.Module, scheme: Scheme | str | None = None, init: Any = None, calib: Tensor | None = None,
                learn_scales: bool = True, learn_zero_points: bool = True, inplace: bool = False,
                progress: bool = True) -> nn.Module:
    """Swap the linears ``scheme`` selects for `FakeQuantLinear` modules, everything else frozen.

    ``init`` picks where training starts: `RTN` (default; the float weights as latent weights, RTN's
    scales), or any method `lowbit.quantize` takes (``GPTQ()``, ``AWQ()``, …, with ``calib``): the
    model is quantised with it first and each layer starts from its decoded codes and their scales
    (AWQ's folded scales stay folded). A model that is already quantised (holds `QuantLinear`
    modules; ``scheme`` None) starts from its own codes.
    """
    from lowbit.api import quantize

    init = RTN() if init is None else init
    target = model if inplace else copy.deepcopy(model)
    learn = {"learn_scale": learn_scales, "learn_zero_point": learn_zero_points}
    if scheme is None:
        if not quantized_modules(target):
            raise LowbitError("prepare_qat needs a scheme for a model that is not quantised yet.")
        info = getattr(target, "lowbit_info", None)
        scheme, method = (info.scheme, info.method) if info is not None else (None, {"name": "loaded"})
    else:
        scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
        if scheme.lm_head is not None:
            raise LowbitError(f"QAT trains the decoder layers' linears and leaves lm_head float; scheme {scheme.name} "
                              "quantises it.")
        if scheme.activations is not None and not scheme.activations.dynamic and isinstance(init, RTN):
            log.info("static activation scales start from the first batch's absmax")
        method = init.to_dict()
        if isinstance(init, RTN):
            linears = select_linears(target, scheme.targets, scheme.ignore)
            if not linears:
                raise LowbitError(f"scheme {scheme.name} selects no linear layer of {type(model).__name__}.")
            for name, linear in tqdm(linears.items(), desc=f"prepare QAT {scheme.name}", unit="layer", leave=False,
                                     disable=None if progress else True):
                set_submodule(target, name, FakeQuantLinear.from_linear(
                    linear, scheme.spec_for(name), scheme.activations, name=f"{name}.weight", **learn))
        else:
            target = quantize(target, scheme, method=init, calib=calib, inplace=True, progress=progress)
    for name, module in quantized_modules(target).items():
        set_submodule(target, name, FakeQuantLinear.from_quant_linear(module, **learn))
    _freeze(target)
    for module in fake_quant_modules(target).values():
        module.weight.requires_grad_(True)
        for param in (module.scale, module.zero_point):  # parameters only where learned (the learn_* flags)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(True)
        if module.act_quant is not None and module.act_quant.scale is not None:  # static: always a Parameter
            module.act_quant.scale.requires_grad_(learn_scales)
    target.lowbit_qat = {"scheme": scheme.to_dict() if scheme is not None else None, "init": method}
    return target


def prepare_qlora(model: nn.Module, scheme: Scheme | str = NF4, rank: int = 16, alpha: float | None = None,
                  targets: tuple[str, ...] | None = None, inplace: bool = False, progress: bool = True) -> nn.Module:
    """A frozen quantised base (``scheme``, NF4 by default; RTN) with trainable `LoRALinear` adapters of
    ``rank`` on every linear the scheme selects (or only those matching ``targets``)."""
    from lowbit.api import quantize

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if targets is not None:
        scheme = scheme.replace(targets=tuple(targets))
    target = quantize(model, scheme, inplace=inplace, progress=progress)
    _freeze(target)
    for i, (name, module) in enumerate(quantized_modules(target).items()):
        set_submodule(target, name, LoRALinear(module, rank, alpha, seed=i))
    target.lowbit_qat = {"scheme": scheme.to_dict(), "init": {"name": "qlora", "rank": rank,
                                                               "alpha": alpha if alpha is not None else 2 * rank}}
    return target


def convert(model: nn.Module, inplace: bool = False, merge: bool = True) -> nn.Module:
    """Trained model → quantised model: every `FakeQuantLinear` becomes a `QuantLinear` holding the same codes
    (its outputs equal the fake-quant model's up to the kernels' float rounding); with ``merge``, every
    `LoRALinear` becomes its base plus adapters re-quantised in the base's format, otherwise it stays."""
    from lowbit.api import QuantInfo

    target = model if inplace else copy.deepcopy(model)
    start = time.perf_counter()
    for name, module in fake_quant_modules(target).items():
        set_submodule(target, name, module.to_quant_linear())
    if merge:
        for name, module in lora_modules(target).items():
            set_submodule(target, name, module.merged())
    use_float_gemv(target)  # as `lowbit.quantize` leaves a model
    meta = getattr(target, "lowbit_qat", None) or {}
    scheme_dict = meta.get("scheme")
    if scheme_dict is None:
        first = next(iter(quantized_modules(target).values()), None)
        if first is None:
            raise LowbitError("the model holds no fake-quantised, LoRA or quantised layer to convert.")
        scheme = Scheme(first.spec, first.activations, name="qat")
    else:
        scheme = Scheme.from_dict(scheme_dict)
    training = getattr(target, "lowbit_training", None)
    method = {"name": "qlora" if lora_modules(model) else "qat", "init": meta.get("init"),
              **({"training": training} if training else {})}
    target.lowbit_info = QuantInfo(scheme, method, time.perf_counter() - start,
                                   getattr(model, "lowbit_source", "unknown"))
    return target


def save_adapters(model: nn.Module, out: str | Path) -> Path:
    """Write the LoRA adapters alone (``adapters.safetensors`` + ``adapters.json``) into directory ``out``."""
    from safetensors.torch import save_file

    from lowbit.io.native import atomic_directory

    adapters = lora_modules(model)
    if not adapters:
        raise LowbitError("the model holds no LoRA adapters to save.")
    tensors, meta = {}, {}
    for name, module in adapters.items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().contiguous().cpu()
        meta[name] = {"rank": module.rank, "alpha": module.alpha}
    with atomic_directory(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "adapters.safetensors"))
        (tmp / "adapters.json").write_text(json.dumps({"adapters": meta}, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# -- the loop -------------------------------------------------------------------------------------

@dataclass
class TrainReport:
    """What a training run did: the loss of every optimiser step, its budget and its cost."""

    config: dict[str, Any]
    losses: list[float]
    steps: int
    tokens: int
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of this process while training, threads summed: on an idle machine
    # with T threads the wall time is about cpu_seconds / T, whatever else ran beside it
    resumed_from: int = 0
    trainable_params: int = 0
    peak_rss_bytes: int = 0
    memory: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def tokens_per_second(self) -> float:
        trained = (self.steps - self.resumed_from) * self.config["batch_size"] * self.config["seqlen"] \
            * self.config["grad_accum"]
        return trained / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# what a checkpoint written before QAT had these fields was trained with
LEGACY_CONFIG = {"scale_grad": "lsq", "train": "all"}


def _apply_training_mode(model: nn.Module, config: QAT) -> None:
    """Set each fake-quant layer's scale gradient (``config.scale_grad``) and what trains (``config.train``):
    ``quant-params`` freezes the codes (`FakeQuantLinear.freeze_codes`), ``all`` trains the latent weights."""
    modules = fake_quant_modules(model)
    if config.train == "quant-params" and not modules:
        raise LowbitError("train='quant-params' trains the scales of fake-quantised layers; this model has none "
                          "(prepare it with lowbit.prepare_qat).")
    for module in modules.values():
        module.scale_grad = config.scale_grad
        if config.train == "quant-params":
            module.freeze_codes()
        else:
            module.unfreeze_codes()


def _param_groups(model: nn.Module, config: QAT) -> list[dict[str, Any]]:
    weights, scales = [], []
    for name, p in trainable_parameters(model):
        (scales if name.endswith(("scale", "zero_point")) else weights).append(p)
    if not weights and not scales:
        raise LowbitError("the model has nothing to train: prepare it with lowbit.prepare_qat or prepare_qlora.")
    groups = []
    if weights:  # none where only the quantisation parameters train
        groups.append({"params": weights, "lr": config.lr, "base_lr": config.lr, "weight_decay": config.weight_decay})
    if scales:
        groups.append({"params": scales, "lr": config.scale_lr, "base_lr": config.scale_lr, "weight_decay": 0.0})
    return groups


def _module_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers of the trained modules (fake-quant and LoRA, their frozen bases included)."""
    out: dict[str, Tensor] = {}
    for prefix, module in {**fake_quant_modules(model), **lora_modules(model)}.items():
        for key, tensor in module.state_dict().items():
            out[f"{prefix}.{key}"] = tensor.detach().contiguous().cpu()
    return out


def _write_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from lowbit.io.native import atomic_directory

    opt_state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for index, entries in opt_state["state"].items():
        for key, value in entries.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    with atomic_directory(directory / CHECKPOINT, overwrite=True) as tmp:
        save_file(_module_state(model), str(tmp / MODULES_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
        (tmp / TRAINER_FILE).write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n",
                                        encoding="utf-8")


def read_checkpoint_state(directory: str | Path) -> dict[str, Any] | None:
    """The trainer state (step, losses, config) of the checkpoint in ``directory``, or None when there is none."""
    path = Path(directory) / CHECKPOINT / TRAINER_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LowbitError(f"checkpoint file '{path}' is not readable JSON ({err}).") from err


def _load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = read_checkpoint_state(directory)
    assert state is not None
    folder = directory / CHECKPOINT
    saved = load_file(str(folder / MODULES_FILE))
    expected = _module_state(model)
    if set(saved) != set(expected):
        missing = sorted(set(expected) - set(saved)) or sorted(set(saved) - set(expected))
        raise LowbitError(f"checkpoint '{folder}' does not belong to this model (tensor {missing[0]} differs).")
    with torch.no_grad():
        for name, tensor in saved.items():
            prefix, _, key = name.rpartition(".")
            module = model.get_submodule(prefix)
            target = getattr(module, key)
            if tuple(target.shape) != tuple(tensor.shape):
                raise LowbitError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model's "
                                  f"{tuple(target.shape)}.")
            target.copy_(tensor)
    opt_tensors = load_file(str(folder / OPTIMIZER_FILE))
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, tensor in opt_tensors.items():
        index, _, name = key.partition(".")
        opt_state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


def _fingerprint(tokens: Tensor) -> dict[str, int]:
    return {"tokens": int(tokens.numel()), "sum": int(tokens.sum()), "weighted": int((tokens[::97] * 31).sum())}


def train_qat(model: nn.Module, text: str | Tensor, config: QAT = QAT(), teacher: nn.Module | None = None,
              tokenizer: Any = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
              device: str | torch.device | None = None, progress: bool = True,
              stop_after: int | None = None) -> TrainReport:
    """Train a model made by `prepare_qat` or `prepare_qlora` on ``text`` (a string, or its token ids).

    ``teacher`` (the float model) is needed for the distillation loss. With ``checkpoint_dir`` a
    checkpoint is written every ``config.checkpoint_every`` steps and at the end; ``resume`` continues
    from the one there (refused when it was made with another config or text). ``stop_after`` ends the
    run after that many steps in total, as an interrupted run would (checkpoint written). ``device``
    defaults to CUDA when there is one. Returns the loss of every step.
    """
    tokens = _tokens(text, tokenizer)
    window_starts(tokens.numel(), config.seqlen, 1, config.seed, 0)  # too short a text: refused before any work
    if config.loss == "distill" and teacher is None:
        raise LowbitError("the distillation loss needs the float model as teacher (or use loss='next-token').")
    _apply_training_mode(model, config)
    groups = _param_groups(model, config)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    from lowbit.sequential import calibration_dtype

    dtype = calibration_dtype(config.dtype, device)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
        teacher.eval()
    model.train()
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    state: dict[str, Any] = {"step": 0, "losses": [], "config": config.to_dict(), "data": _fingerprint(tokens)}
    if directory is not None:
        found = read_checkpoint_state(directory)
        if found is not None and not resume:
            raise LowbitError(f"'{directory}' already holds a checkpoint (step {found['step']}); resume it or choose "
                              "another directory.")
        if found is not None:
            if {**LEGACY_CONFIG, **found.get("config", {})} != state["config"]:
                raise LowbitError(f"the checkpoint in '{directory}' was made with another training config; resume "
                                  "with the same options.")
            if found.get("data") != state["data"]:
                raise LowbitError(f"the checkpoint in '{directory}' was trained on another text.")
            state = _load_checkpoint(directory, model, optimizer)
            state.pop("param_groups", None)
    start_step = state["step"]
    last_good = start_step if directory is not None and start_step else None
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    start, cpu_start = time.perf_counter(), time.process_time()
    trained_tokens = 0
    bar = tqdm(total=config.steps, initial=start_step, desc="QAT" if fake_quant_modules(model) else "QLoRA",
               unit="step", disable=None if progress else True)
    params = [p for g in groups for p in g["params"]]
    try:
        for step in range(start_step, end):
            factor = lr_factor(step, config.steps, config.warmup, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss = _accumulate(model, teacher, tokens, config, step, device, dtype)
            if not math.isfinite(loss):
                _diverged(step, f"the loss became {loss}", config, directory, last_good)
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm else math.inf)
            if not torch.isfinite(norm):
                _diverged(step, "a gradient became non-finite", config, directory, last_good)
            try:
                optimizer.step()
            except RuntimeError as err:  # AdamW's step size itself overflowed float32 (an absurd learning rate)
                if "overflow" not in str(err):
                    raise
                _diverged(step, "the update overflowed float32", config, directory, last_good)
            optimizer.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(p).all()) for p in params):
                _diverged(step, "a trained parameter became non-finite", config, directory, last_good)
            state["losses"].append(loss)
            state["step"] = step + 1
            trained_tokens += config.tokens_per_step
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{trained_tokens / elapsed:.0f}" if elapsed else "-")
            log.info("step %d/%d: loss %.5f, %.1f tokens/s", step + 1, config.steps, loss, trained_tokens / elapsed)
            at_end = step + 1 == end
            if directory is not None and ((config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)
                                          or at_end):
                _write_checkpoint(directory, model, optimizer, state)
                last_good = step + 1
    finally:
        bar.close()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    report = TrainReport(config.to_dict(), list(state["losses"]), state["step"], state["step"] * config.tokens_per_step,
                         seconds, cpu_seconds, start_step, sum(p.numel() for p in params), peak_rss_bytes(),
                         _memory(model, optimizer, device), str(device), str(dtype).replace("torch.", ""))
    model.lowbit_training = {k: v for k, v in report.to_dict().items() if k != "losses"}
    return report


def _tokens(text: str | Tensor, tokenizer: Any) -> Tensor:
    if isinstance(text, Tensor):
        tokens = text.reshape(-1).long()
    else:
        if not text.strip():
            raise LowbitError("the training text is empty.")
        from lowbit.calibration import tokenize
        from lowbit.models import load_pretrained_tokenizer

        tokens = tokenize(tokenizer if tokenizer is not None else load_pretrained_tokenizer(None), text)
    if tokens.numel() == 0:
        raise LowbitError("the training text is empty.")
    return tokens


def _accumulate(model: nn.Module, teacher: nn.Module | None, tokens: Tensor, config: QAT, step: int,
                device: torch.device, dtype: torch.dtype) -> float:
    """Forward and backward of one optimiser step's micro-batches; returns the mean loss."""
    starts = window_starts(tokens.numel(), config.seqlen, config.batch_size * config.grad_accum, config.seed, step)
    total = 0.0
    for micro in range(config.grad_accum):
        chosen = starts[micro * config.batch_size:(micro + 1) * config.batch_size]
        ids = torch.stack([tokens[s:s + config.seqlen] for s in chosen]).to(device)  # (B, T)
        with _autocast(device, dtype):
            if config.loss == "distill":
                with torch.no_grad():  # not inference_mode: the loss's backward keeps the teacher's logits
                    target = teacher(input_ids=ids, use_cache=False).logits  # type: ignore[misc]
                logits = model(input_ids=ids, use_cache=False).logits
                loss = distillation_loss(logits, target, config.temperature)
            else:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = next_token_loss(logits, ids)
        (loss / config.grad_accum).backward()
        total += float(loss.detach()) / config.grad_accum
    return total


def _diverged(step: int, what: str, config: QAT, directory: Path | None, last_good: int | None) -> None:
    kept = (f"the last good checkpoint (step {last_good}) is kept in '{directory}'" if last_good is not None
            else "no checkpoint was written yet" if directory is not None else "no checkpoint directory was given")
    raise LowbitError(f"training diverged at step {step + 1}: {what} with learning rate {config.lr:g} (scales "
                      f"{config.scale_lr:g}); {kept}; lower the learning rate.")


def _memory(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, int]:
    """Bytes held by the frozen quantised bases, the trained parameters, their optimiser state, and the peak."""
    frozen = 0
    for module in lora_modules(model).values():
        frozen += sum(t.numel() * t.element_size() for t in module.base.buffers())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
              if isinstance(t, Tensor))
    out = {"frozen_base_bytes": frozen, "trainable_bytes": trained, "optimizer_bytes": opt,
           "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


__all__ = ["TrainReport", "convert", "prepare_qat", "prepare_qlora", "read_checkpoint_state", "save_adapters",
           "train_qat", "trainable_parameters"]
