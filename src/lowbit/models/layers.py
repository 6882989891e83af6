"""Finding what to quantise in any causal LM, without per-architecture code.

Architecture knowledge is data: a linear layer is chosen by regular expressions over its
qualified module name (``model.layers.3.self_attn.q_proj``), and the decoder layers are
the longest ``nn.ModuleList`` in the model, which is where every Hugging Face decoder
keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from lowbit.errors import LowbitError


def _compile(patterns: Iterable[str], option: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise LowbitError(f"{option} pattern {pattern!r} is not a valid regular expression ({err}).") from err
    return compiled


def name_filter(targets: Iterable[str], ignore: Iterable[str]) -> Callable[[str], bool]:
    """A predicate: the name matches some target and no ignore pattern (``re.fullmatch``)."""
    want = _compile(targets, "target")
    skip = _compile(ignore, "ignore")
    return lambda name: any(p.fullmatch(name) for p in want) and not any(p.fullmatch(name) for p in skip)


def select_linears(model: nn.Module, targets: Iterable[str], ignore: Iterable[str]) -> dict[str, nn.Linear]:
    """Name → module of every ``nn.Linear`` matched by a target and by no ignore pattern."""
    chosen = name_filter(targets, ignore)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and chosen(name)}


def output_embedding_name(model: nn.Module) -> str | None:
    """The module name of the model's output projection (``get_output_embeddings``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return None if head is None else next((n for n, m in model.named_modules() if m is head), None)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's decoder layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise LowbitError(f"{type(model).__name__} has no ModuleList of decoder layers.")
    return best


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
