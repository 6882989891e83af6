"""A quantised KV cache: attention reads keys and values as a b-bit cache holds them, optionally rotated.

Every key (after RoPE) and every value is quantised on its own, per token and head: asymmetric
integers over the head dimension (or groups of it), one float16 scale and zero point each — the
layout of KIVI's value cache and QuaRot's cache (Ashkboos et al. 2024, arXiv 2404.00456, §4.2).
Because each (token, head) vector is quantised independently of every other token, quantising the
keys and values each time attention reads them gives exactly what a cache that stored them
quantised would return; what this module changes is the numbers attention sees, which is what
the accuracy of a quantised cache depends on. (The cache object itself stays in the model's
dtype: a packed store is the serving engine's part, e.g. vLLM's ``kv_cache_dtype``.)

Rotations (QuaRot §4.2): queries and keys are both multiplied by the orthogonal Hadamard H/√d over
the head dimension, which leaves every q·k unchanged, and values likewise, the rotation undone on
the attention output (Σ a_t·H v_t = H·Σ a_t v_t). Keys have a few outlier channels (RoPE pairs
with large magnitude); H spreads them over all d channels, so one scale per vector loses less.
With ``bits=None`` only the rotations run: the float function is unchanged (a test checks it).

    from lowbit.kv_cache import KVQuant, quantize_kv_cache
    quantize_kv_cache(model, KVQuant(bits=4, rotate=True))   # in place; KVQuant(None) undoes it
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import hadamard_transform, supports
from lowbit.models.layers import decoder_layers
from lowbit.scheme import QuantSpec
from lowbit.tensor import fake_quantize

INNER = ("sdpa", "eager")  # attention implementations this wraps (each keeps its own mask format)


@dataclass(frozen=True)
class KVQuant:
    """How attention's keys and values are stored: ``bits`` 2–8 (None: not quantised), ``group_size``
    channels of the head dimension per scale (None: the whole head), Hadamard ``rotate``."""

    bits: int | None = 8
    group_size: int | None = None
    rotate: bool = True

    def __post_init__(self) -> None:
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise LowbitError(f"KV cache bits must lie between 2 and 8 (or None), got {self.bits}.")
        if self.group_size is not None and self.group_size <= 0:
            raise LowbitError(f"KV cache group size must be positive, got {self.group_size}.")

    @property
    def active(self) -> bool:
        return self.bits is not None or self.rotate

    def spec(self, head_dim: int) -> QuantSpec | None:
        if self.bits is None:
            return None
        if self.group_size is None or self.group_size >= head_dim:
            return QuantSpec("int", self.bits, "token", symmetric=False, dynamic=True)
        if head_dim % self.group_size:
            raise LowbitError(f"KV cache group size {self.group_size} does not divide the head dimension {head_dim}.")
        return QuantSpec("int", self.bits, "group", self.group_size, symmetric=False, dynamic=True)

    def describe(self) -> str:
        bits = "float" if self.bits is None else f"int{self.bits}" + (f" g{self.group_size}" if self.group_size else "")
        return f"KV {bits}" + (" + Hadamard" if self.rotate else "")


def _name(inner: str) -> str:
    return f"lowbit_kv_{inner}"


def _inner_function(module: nn.Module, inner: str):
    """The attention the wrapper calls: torch's sdpa as transformers registers it, or the model's own eager
    function (eager is not in the registry: each modelling file defines its own)."""
    if inner == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise LowbitError(f"{type(module).__name__} defines no eager_attention_forward to wrap; use sdpa attention.")
    return eager


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               **kwargs):
    """The wrapper every layer's attention calls: settings, spec and inner function were resolved once, by
    `quantize_kv_cache`, and kept on the module (this runs for every layer at every step)."""
    config, spec, inner = module.lowbit_kv
    if config.rotate:
        query, key, value = hadamard_transform(query), hadamard_transform(key), hadamard_transform(value)
    if spec is not None:
        key, value = fake_quantize(key, spec), fake_quantize(value, spec)
    out, weights = inner(module, query, key, value, attention_mask, **kwargs)
    if config.rotate:  # out is (…, heads, head_dim) whichever inner ran
        out = hadamard_transform(out, transpose=True)
    return out, weights


for _inner in INNER:  # registered once, by name; the settings live on each attention module
    AttentionInterface.register(_name(_inner), _attention)
    AttentionMaskInterface.register(_name(_inner), ALL_MASK_ATTENTION_FUNCTIONS[_inner])


def quantize_kv_cache(model: nn.Module, config: KVQuant) -> nn.Module:
    """Make every attention layer of ``model`` read its keys and values as ``config`` stores them (in
    place; returns the model). ``KVQuant(bits=None, rotate=False)`` restores plain attention."""
    _, layers = decoder_layers(model)
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    if not attentions or any(a is None or not hasattr(a, "head_dim") for a in attentions):
        raise LowbitError(f"{type(model).__name__}: KV cache quantisation needs decoder layers with a self_attn "
                          "module that has a head_dim (the Llama family's layout).")
    head_dim = attentions[0].head_dim
    if config.rotate and not supports(head_dim):
        raise LowbitError(f"no Hadamard transform of the head dimension {head_dim} is built here; pass rotate=False.")
    spec = config.spec(head_dim)  # checks the group size
    current = model.config._attn_implementation
    inner = current.removeprefix("lowbit_kv_")
    if inner not in INNER:
        raise LowbitError(f"KV cache quantisation wraps sdpa or eager attention, not {current!r}; load the model "
                          "with attn_implementation='sdpa' or 'eager'.")
    functions = [_inner_function(attention, inner) for attention in attentions]  # all resolved before any change
    for attention, function in zip(attentions, functions):
        attention.lowbit_kv = (config, spec, function)
    model.set_attn_implementation(_name(inner) if config.active else inner)
    return model
