"""Where a per-input-channel scale can be folded: the producer of a linear layer's input.

AWQ and SmoothQuant multiply the input columns of the linears that read one tensor
(q/k/v, gate/up, o, down) by a positive vector s, and divide the operation that *makes*
that tensor by s, so that the float model computes the same function before rounding:

    norm → linears      y = (x̂ ⊙ w) Wᵀ  =  (x̂ ⊙ w / s) (W·diag(s))ᵀ
    linear → linear     the producer's output rows (and bias) divided by s; allowed where
                        only elementwise products sit between them (up → down: SiLU(gate) ⊙ up)
                        or an attention-weighted sum (v → o)

Which module produces a group's input is architecture knowledge, kept as data:
`SCALE_MAPPINGS` holds (producer, consumers) regular expressions over module names
inside one decoder layer (``re.fullmatch``). A group no mapping names falls back to the
generic rule: the module whose output *is* the group's input tensor (seen on a probe) and
that has a 1-D ``weight`` over the input features — a LayerNorm or RMSNorm. Nothing here
is trusted blindly: `fold_scale` is checked by the caller on a probe (the layer's output
must not change), and a fold that changes it is undone and reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

# (producer, consumers): the consumers' names must all match the second pattern, and exactly
# one module of the layer the first. Llama, Mistral, Qwen2/3, Gemma, Phi-3, OPT, GPT-NeoX, Falcon, …
SCALE_MAPPINGS: tuple[tuple[str, str], ...] = (
    (r"(.*\.)?(input_layernorm|self_attn_layer_norm|ln_1|attention_norm)",
     r"(.*\.)?(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|wq|wk|wv)"),
    (r"(.*\.)?(post_attention_layernorm|pre_feedforward_layernorm|final_layer_norm|ln_2|ffn_norm)",
     r"(.*\.)?(gate_proj|up_proj|gate_up_proj|fc1|dense_h_to_4h|w1|w3|c_fc)"),
    (r"(.*\.)?v_proj", r"(.*\.)?(o_proj|out_proj|dense)"),
    (r"(.*\.)?up_proj", r"(.*\.)?down_proj"),
    (r"(.*\.)?w3", r"(.*\.)?w2"),
)


@dataclass(frozen=True)
class Producer:
    """The module whose output a group of linears reads, or why none can take the scale."""

    name: str | None
    module: nn.Module | None
    reason: str | None = None  # set when name/module are None


def _norm_like(module: nn.Module, features: int) -> bool:
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, Tensor) and weight.dim() == 1
            and weight.numel() == features)


def find_producer(layer: nn.Module, group: list[str], made_by: dict[str, str | None]) -> Producer:
    """The producer of the input that the linears ``group`` (names local to ``layer``) share.

    ``made_by`` maps each linear to the module whose output was its input tensor on a
    probe (None when the tensor was made by plain torch ops); see `input_producers`.
    """
    modules = dict(layer.named_modules())
    features = modules[group[0]].in_features
    label = ", ".join(group)
    for producer_pattern, consumer_pattern in SCALE_MAPPINGS:
        if not all(re.fullmatch(consumer_pattern, name) for name in group):
            continue
        found = [n for n in modules if n not in group and re.fullmatch(producer_pattern, n)]
        if len(found) != 1:
            continue
        name, module = found[0], modules[found[0]]
        if isinstance(module, nn.Linear):
            if module.out_features != features:
                return Producer(None, None, f"{name}'s {module.out_features} outputs do not line up with the "
                                            f"{features} inputs of {label} (grouped-query attention?)")
        elif not _norm_like(module, features):
            return Producer(None, None, f"{name} has no {features}-element weight to divide by the scale")
        return Producer(name, module)
    makers = {made_by.get(n) for n in group}
    if len(makers) == 1 and (maker := makers.pop()) is not None and _norm_like(modules[maker], features):
        return Producer(maker, modules[maker])
    return Producer(None, None, f"no mapping names the producer of {label}'s input, and it is not the output "
                                "of a norm module")


def input_producers(layer: nn.Module, run, linears: dict[str, nn.Module]) -> dict[str, str | None]:
    """For each linear, the submodule of ``layer`` whose output tensor it read, from one call of ``run()``."""
    made: dict[int, str] = {}
    read: dict[str, str | None] = {}
    alive: list[Tensor] = []  # held, so that no later tensor can take a freed output's address
    handles = []
    for name, module in layer.named_modules():
        if not name:
            continue

        def out_hook(_m, _args, out, name=name) -> None:
            if isinstance(out, Tensor):
                alive.append(out)
                made[out.data_ptr()] = name
        handles.append(module.register_forward_hook(out_hook))
    for name, linear in linears.items():
        def in_hook(_m, args, name=name) -> None:
            read.setdefault(name, made.get(args[0].data_ptr()))
        handles.append(linear.register_forward_pre_hook(in_hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return read


def fold_scale(producer: nn.Module, consumers: list[nn.Linear], s: Tensor) -> None:
    """Divide the producer's output channels by ``s`` (C,) and multiply the consumers' input columns by it.

    The float function of the layer is unchanged (up to rounding) when the producer's output
    reaches the consumers only through operations that commute with a per-channel scale.
    """
    s = s.detach()
    # New tensors, not in-place: a caller that kept the old ones can undo the fold exactly, and a
    # weight memory-mapped from its file is never written through.
    if isinstance(producer, nn.Linear):
        producer.weight.data = producer.weight.data / s.to(producer.weight.dtype)[:, None]
    else:
        producer.weight.data = producer.weight.data / s.to(producer.weight.dtype)
    bias = getattr(producer, "bias", None)
    if isinstance(bias, Tensor):
        bias.data = bias.data / s.to(bias.dtype)
    for linear in consumers:
        linear.weight.data = linear.weight.data * s.to(linear.weight.dtype)[None, :]

__all__ = ["Producer", "SCALE_MAPPINGS", "find_producer", "fold_scale", "input_producers"]
