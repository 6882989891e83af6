"""QuaRot-style rotation of the residual stream, folded into the weights (float function unchanged).

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024, arXiv 2404.00456,
§4 (after SliceGPT's computational invariance, Ashkboos et al. 2024, arXiv 2401.15024). With R
an orthogonal (hidden × hidden) matrix — here a randomised Hadamard, `lowbit.formats.hadamard` —
every residual-stream vector h (a row) is replaced by h·R:

- RMSNorm commutes with R once its weight is folded into the linears that read it
  (‖h·R‖ = ‖h‖): each reader's W becomes W·diag(w), the norm's weight becomes 1;
- linears that read the stream (q/k/v, gate/up, lm_head): W ← W·R;
- linears that write to it (o, down): W ← Rᵀ·W (and a bias b ← b·R);
- the embedding: E ← E·R (the head is untied from it first: it also carries the final norm).

An online Hadamard before each down projection (`OnlineHadamard`: x ↦ H x at run time, with
W_down ← W_down·Hᵀ folded) spreads the MLP's intermediate outliers too. The rotated float model
computes the same logits (a test checks it); quantising it afterwards with per-token activations
(W4A8, W4A4) sees activations without outlier channels. Names are the Llama family's
(`ROTATION_NAMES`); other layouts are refused, not guessed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import hadamard_size, hadamard_transform, random_signs, randomized_hadamard
from lowbit.models.layers import decoder_layers

# (attribute path inside a decoder layer, role): the Llama / Mistral / Qwen2 layout
ROTATION_NAMES = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


class OnlineHadamard(nn.Module):
    """y = linear(H x / √n): the linear's weight holds W·Hᵀ/√n, so the product is unchanged; any linear
    module (float or quantised) may sit inside, and it sees the transformed x."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(hadamard_transform(x))


def _get(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError as err:
        raise LowbitError(f"rotation expects a Llama-style decoder layer with {path}; this model has none.") from err


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    w = norm.weight.data.double()
    for linear in readers:
        linear.weight.data = (linear.weight.data.double() * w[None, :]).to(linear.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def _rotate_input(linear: nn.Linear, signs: Tensor) -> None:
    """W ← W·R with R = (H·diag(s)/√n)ᵀ, i.e. each row w ↦ V w for V = H·diag(s)/√n (x·R = x·Vᵀ)."""
    linear.weight.data = randomized_hadamard(linear.weight.data.double(), signs.double()).to(linear.weight.dtype)


def rotate_model(model: nn.Module, seed: int = 0, online_down: bool = True) -> nn.Module:
    """Rotate ``model`` (a Hugging Face Llama-style causal LM) in place; returns it. The residual
    rotation is h ↦ h·Vᵀ with V = H·diag(s)/√d (s from ``seed``); with ``online_down`` each down
    projection gets an `OnlineHadamard`."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    final_norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(embed, nn.Embedding) or final_norm is None or not isinstance(head, nn.Linear):
        raise LowbitError("rotation expects a causal LM with model.embed_tokens, model.norm and lm_head.")
    d = embed.embedding_dim
    hadamard_size(d)  # refuses a hidden size without a transform
    signs = random_signs(d, seed)
    _, layers = decoder_layers(model)
    if head.weight is embed.weight:  # untie: the head also takes the final norm's weight
        head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    with torch.no_grad():
        for layer in layers:
            for norm_name, readers in ROTATION_NAMES.items():
                linears = [_get(layer, r) for r in readers]
                _fold_norm(_get(layer, norm_name), linears)  # type: ignore[arg-type]
                for linear in linears:
                    _rotate_input(linear, signs)  # type: ignore[arg-type]
            for writer in WRITERS:
                linear = _get(layer, writer)
                # W ← Rᵀ·W: each output column (a residual vector) rotated, W's columns as rows
                linear.weight.data = randomized_hadamard(linear.weight.data.double().T,
                                                         signs.double()).T.to(linear.weight.dtype).contiguous()
                if getattr(linear, "bias", None) is not None:
                    linear.bias.data = randomized_hadamard(linear.bias.data.double(), signs.double()).to(
                        linear.bias.dtype)
            if online_down:
                down = _get(layer, "mlp.down_proj")
                hadamard_size(down.in_features)  # type: ignore[arg-type]
                down.weight.data = hadamard_transform(down.weight.data.double()).to(down.weight.dtype)
                layer.mlp.down_proj = OnlineHadamard(down)
        _fold_norm(final_norm, [head])
        _rotate_input(head, signs)
        embed.weight.data = randomized_hadamard(embed.weight.data.double(), signs.double()).to(embed.weight.dtype)
    return model


__all__ = ["OnlineHadamard", "rotate_model"]
