"""Folding per-channel scales into the producer of each linear's input (lowbit.models.mappings, lowbit.smoothing).

The real default model (SmolLM2: RMSNorm → q/k/v, RMSNorm → gate/up, up → down, and v → o
refused because grouped-query attention gives v fewer outputs than o has inputs) and a
small multi-head Llama built here (where v → o folds) must compute the same logits after
folding strongly uneven scales; producers that cannot take a scale are skipped with a
reason and leave the model's function alone.
"""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.calibration.pipeline import LayerInputs, capture_first_layer_inputs, run_layer
from lowbit.models.mappings import find_producer, fold_scale, input_producers
from lowbit.sequential import shared_input_groups
from lowbit.smoothing import ChannelStats, smooth_layer


def _fold_random_scales(model: nn.Module, tokens: torch.Tensor) -> dict[str, str]:
    """Fold log-normal scales into every group whose producer is found; returns the groups and producers."""
    gen = torch.Generator().manual_seed(0)
    _, layers, probe = capture_first_layer_inputs(model, tokens[:1, :16], 1)
    folded = {}
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        groups = shared_input_groups(layer, probe, linears)
        made_by = input_producers(layer, lambda: run_layer(layer, probe), linears)
        for group in groups:
            producer = find_producer(layer, group, made_by)
            if producer.module is None:
                continue
            s = torch.exp(torch.randn(linears[group[0]].in_features, generator=gen))  # e^N(0,1): 0.05 … 20
            fold_scale(producer.module, [linears[n] for n in group], s)
            folded[f"{i}:{'+'.join(group)}"] = producer.name
        probe = LayerInputs(run_layer(layer, probe), probe.kwargs)
    return folded


def test_folded_default_model_computes_the_same_logits(default_model, eval_tokens):
    model = copy.deepcopy(default_model)
    tokens = eval_tokens[:256].reshape(2, 128)
    folded = _fold_random_scales(model, tokens)
    assert folded["0:self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"] == "input_layernorm"
    assert folded["0:mlp.gate_proj+mlp.up_proj"] == "post_attention_layernorm"
    assert folded["29:mlp.down_proj"] == "mlp.up_proj"
    assert len(folded) == 30 * 3  # o_proj: v has 192 outputs for o's 576 inputs (3 KV heads of 9)
    changed = model.model.layers[3].input_layernorm.weight
    assert not torch.allclose(changed, default_model.model.layers[3].input_layernorm.weight)
    with torch.inference_mode():
        want = default_model(tokens).logits
        got = model(tokens).logits
    assert torch.allclose(got, want, rtol=0, atol=2e-3 * want.abs().max())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.999


@pytest.fixture(scope="module")
def mha_llama():
    """Two Llama layers with as many KV heads as heads: v → o folds too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms that are not all ones, as in a trained model
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    return model


def test_value_to_output_folds_in_multi_head_attention(mha_llama):
    model = copy.deepcopy(mha_llama)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    folded = _fold_random_scales(model, tokens)
    assert folded["0:self_attn.o_proj"] == "self_attn.v_proj" and len(folded) == 2 * 4
    with torch.inference_mode():
        assert torch.allclose(model(tokens).logits, mha_llama(tokens).logits, atol=1e-4)


class OffsetNorm(nn.Module):
    """Gemma-style RMSNorm, x̂·(1 + w): dividing w by s does not divide the output by s."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach() - 1.0, requires_grad=False)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (1.0 + self.weight)


def _smooth_first_layer(model, tokens, method):
    _, layers, inputs = capture_first_layer_inputs(model, tokens, 2)
    _, _, probe = capture_first_layer_inputs(model, tokens[:1, :16], 1)
    layer = layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups = shared_input_groups(layer, probe, linears)
    stats = {g[0]: ChannelStats.zeros(linears[g[0]].in_features, True, 0, torch.device("cpu")) for g in groups}
    hooks = [linears[k].register_forward_pre_hook(lambda m, a, s=s: s.add(a[0])) for k, s in stats.items()]
    before = run_layer(layer, inputs)
    for h in hooks:
        h.remove()
    smoothed = smooth_layer(model, layer, stats, probe, linears, groups, "layer0.", method, lowbit.W4A16.weights, None)
    return smoothed, before, run_layer(layer, inputs)


def test_producer_that_cannot_absorb_a_scale_is_skipped(mha_llama):
    model = copy.deepcopy(mha_llama)
    layer = model.model.layers[0]
    layer.post_attention_layernorm = OffsetNorm(layer.post_attention_layernorm)
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    smoothed, before, after = _smooth_first_layer(model, tokens, lowbit.AWQ())
    reason = smoothed.skipped["layer0.mlp.gate_proj+mlp.up_proj"]
    assert "changed the layer's float output" in reason and "post_attention_layernorm" in reason
    assert "layer0.self_attn.q_proj+self_attn.k_proj+self_attn.v_proj" in smoothed.records
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after))  # function unchanged


def test_all_zero_activations_are_skipped_not_divided_by(mha_llama):
    model = copy.deepcopy(mha_llama)
    layer = model.model.layers[0]
    layer.mlp.up_proj.weight.data.zero_()  # down_proj's input, SiLU(gate) ⊙ up, is then zero everywhere
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    smoothed, before, after = _smooth_first_layer(model, tokens, lowbit.AWQ())
    assert smoothed.skipped["layer0.mlp.down_proj"] == "its inputs are all zero on the calibration set"
    assert all(torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after))


def test_tied_producer_is_skipped(mha_llama):
    model = copy.deepcopy(mha_llama)
    model.model.layers[1].input_layernorm.weight = model.model.layers[0].input_layernorm.weight  # shared
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = model(tokens).logits
    smoothed, _, _ = _smooth_first_layer(model, tokens, lowbit.SmoothQuant())
    assert "shared with other modules" in smoothed.skipped["layer0.self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"]
    with torch.inference_mode():
        assert torch.allclose(model(tokens).logits, want, atol=1e-5)

