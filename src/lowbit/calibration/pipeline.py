"""Run calibration data through a model one decoder layer at a time.

The inputs of the first decoder layer — hidden states, and whatever keyword arguments
the model passes its layers (attention mask, position ids, rotary cos/sin) — are
captured by a pre-hook while the model's own forward runs (with its layer list cut to
that one layer, and stopped as soon as the hook has them), so nothing the model computes
is re-implemented here. From then on each
layer is run directly on the captured inputs: statistics of its linear layers' inputs
are collected with forward hooks, the layer is quantised, and its *quantised* outputs
become the next layer's inputs. Only one layer's activations are alive at a time.

Any causal LM whose decoder layers sit in an ``nn.ModuleList`` works; see
`lowbit.models.decoder_layers`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models import decoder_layers

log = logging.getLogger(__name__)


class InputStatistic(Protocol):
    def add(self, x: Tensor) -> None: ...


@dataclass
class LayerInputs:
    """Per calibration batch: the hidden states entering a layer and the layer's other kwargs."""

    hidden: list[Tensor]  # each (B, T, D)
    kwargs: list[dict[str, Any]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Captured(Exception):
    """Raised by the capturing pre-hook: nothing after the first layer's inputs is needed."""


def _first(output: Any) -> Tensor:
    """A decoder layer returns its hidden states, alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors (also inside tuples, like rotary cos/sin) in ``dtype``; anything else as it is."""
    if dtype is None:
        return value
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def capture_first_layer_inputs(model: nn.Module, calib: Tensor, batch_size: int = 8, dtype: torch.dtype | None = None
                               ) -> tuple[str, nn.ModuleList, LayerInputs]:
    """Run ``calib`` (N, T) token ids up to the first decoder layer and keep its inputs.

    With ``dtype``, the floating inputs (hidden states, rotary cos/sin, a float mask) are
    kept in it.
    """
    if calib.dim() != 2 or calib.numel() == 0:
        raise LowbitError(f"calibration tokens must be a non-empty (sequences, length) tensor, got {tuple(calib.shape)}.")
    name, layers = decoder_layers(model)
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    captured = LayerInputs([], [])

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(_cast(hidden.detach(), dtype))
        captured.kwargs.append({k: _cast(v, dtype) for k, v in kwargs.items()
                                if k not in ("cache", "past_key_values", "use_cache")})
        raise _Captured

    device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    setattr(owner, attr, nn.ModuleList([layers[0]]))  # the model's own forward, cut after layer 0
    try:
        with torch.inference_mode():
            for batch in calib.split(batch_size):
                try:
                    owner(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        setattr(owner, attr, layers)
        handle.remove()
    return name, layers, captured


def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[Tensor]:
    """The layer's outputs for every captured batch."""
    with torch.inference_mode():
        return [_first(layer(h, **kw)).detach() for h, kw in zip(inputs.hidden, inputs.kwargs)]


def collect(layer: nn.Module, inputs: LayerInputs, targets: dict[str, nn.Module],
            make: Callable[[nn.Module], InputStatistic]) -> tuple[dict[str, InputStatistic], list[Tensor]]:
    """Run the layer once with hooks feeding each target's input to a fresh statistic.

    Returns the statistics by name and the layer's outputs for this pass.
    """
    stats = {name: make(module) for name, module in targets.items()}
    handles = []
    for name, module in targets.items():
        def hook(_m: nn.Module, args: tuple, _out: Any, stat: InputStatistic = stats[name]) -> None:
            stat.add(args[0].detach())

        handles.append(module.register_forward_hook(hook))
    try:
        outputs = run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


def run_layer_staged(layer: nn.Module, inputs: LayerInputs, modules: dict[str, nn.Module],
                     stage: Callable[[str], str], observe: Callable[[str, Tensor], None],
                     finish: Callable[[str], None]) -> list[Tensor]:
    """Run ``layer`` over all chunks of ``inputs`` as one batch that pauses before each stage.

    Every module in ``modules`` belongs to the stage ``stage(name)`` (q/k/v one stage, o the
    next, …). When a chunk's forward is about to call a module of an unfinished stage,
    ``observe(stage, x)`` receives the module's input and the chunk pauses. When every
    chunk has paused there (or finished), ``finish(stage)`` runs — GPTQ quantises the
    stage's weights from the statistics ``observe`` gathered — and the chunks resume;
    modules of finished stages run without pausing. The result equals one forward over
    all chunks at once with the same hooks, but only the paused chunks' live tensors and
    one running chunk's temporaries are in memory.

    Each chunk's forward is a greenlet: a coroutine on the caller's own thread, so torch's
    thread-local state (inference mode, autocast) is the caller's and no thread or malloc
    arena is created. ``inputs.hidden`` is consumed: each entry is released once its
    chunk's output exists. Returns the outputs in chunk order.
    """
    from greenlet import greenlet

    n = len(inputs.hidden)
    at: list[str | None] = [None] * n  # per chunk: the stage it waits at, None once finished
    outputs: list[Tensor | None] = [None] * n
    finished: set[str] = set()
    scheduler = greenlet.getcurrent()

    def pre_hook(_module: nn.Module, args: tuple, name: str) -> None:
        key = stage(name)
        if key in finished:
            return
        observe(key, args[0].detach())
        scheduler.switch(key)  # pause until the stage is finished

    def chunk(i: int) -> None:
        hidden, inputs.hidden[i] = inputs.hidden[i], None
        outputs[i] = _first(layer(hidden, **inputs.kwargs[i])).detach()

    handles = [m.register_forward_pre_hook(functools.partial(pre_hook, name=name)) for name, m in modules.items()]
    chunks = [greenlet(functools.partial(chunk, i)) for i in range(n)]
    try:
        with torch.inference_mode():
            for i in range(n):
                at[i] = chunks[i].switch()  # runs to its first pause (a stage name) or to its end (None)
            while True:
                waiting = [key for key in at if key is not None]
                if not waiting:
                    break
                key = waiting[0]  # the stage the earliest chunk waits at
                if any(k != key for k in waiting):
                    log.warning("calibration chunks of one layer reach its modules in different orders "
                                "(data-dependent routing?); finishing %s with the chunks that reached it", key)
                finished.add(key)
                finish(key)
                for i in range(n):
                    if at[i] == key:
                        at[i] = chunks[i].switch()
    finally:
        for g in chunks:  # after an error: unwind the paused chunks (GreenletExit in each)
            if g and not g.dead:
                g.throw()
        for handle in handles:
            handle.remove()
    return outputs  # type: ignore[return-value]
