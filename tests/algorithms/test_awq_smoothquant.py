"""AWQ and SmoothQuant: their pure cores on real layers of the default model, and the whole path on a few layers.

The cores are checked where they can fail: AWQ's scales must lower a real layer's output
error under W4/W3 rounding (against RTN, measured on held-out tokens, not the ones it
searched on), its clipping too; SmoothQuant must flatten the per-channel activation maxima
and lower the W8A8 output error. End to end, on the model's first four layers (with its
own embeddings, norm and head), AWQ beats RTN and SmoothQuant beats naive W8A8 in KL.
"""


import pytest
import torch

import lowbit
from lowbit.algorithms.awq import (awq_clip_ranges, awq_scale, awq_search, fake_quantize_weight, output_error,
                                   quantize_in_range)
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.smoothquant import smoothquant_scale, w8a8_output_error, weight_column_max
from lowbit.calibration.pipeline import capture_first_layer_inputs, run_layer
from lowbit.errors import LowbitError
from lowbit.eval import EvalConfig, evaluate_tokens, reference_stats

SHORT = EvalConfig(window=512, max_windows=2, kl_windows=1)


@pytest.fixture(scope="module")
def calib(default_tokenizer):
    return lowbit.calibration_set("pydoc-calib", n=8, seqlen=256, tokenizer=default_tokenizer)


@pytest.fixture(scope="module")
def layer2_inputs(default_model, calib):
    """Inputs of layer 2's gate/up and down_proj on calibration tokens: (search half, held-out half)."""
    _, layers, inputs = capture_first_layer_inputs(default_model, calib, 4)
    for layer in layers[:2]:
        inputs = type(inputs)(run_layer(layer, inputs), inputs.kwargs)
    mlp = layers[2].mlp
    seen = {}
    def keep(key):
        return lambda _m, args: seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(keep(k)) for k, m in (("up", mlp.up_proj), ("down", mlp.down_proj))]
    run_layer(layers[2], inputs)
    for h in hooks:
        h.remove()
    out = {}
    for key, parts in seen.items():
        X = torch.cat(parts)
        out[key] = (X[: len(X) // 2], X[len(X) // 2:])
    return layers[2], out


def _hessian(X):
    acc = HessianAccumulator.zeros(X.shape[1])
    acc.add(X)
    return acc.hessian()


@pytest.mark.parametrize("scheme", [lowbit.W4A16, lowbit.W3A16], ids=["w4g128", "w3g128"])
def test_awq_scales_lower_the_held_out_output_error(layer2_inputs, scheme):
    layer, inputs = layer2_inputs
    spec = scheme.weights
    for key, weights in (("up", [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                         ("down", [layer.mlp.down_proj.weight])):
        X, X_held = inputs[key]
        s, alpha, errors = awq_search(weights, _hessian(X), X.abs().mean(0), spec)
        assert 0 < alpha < 1 and errors[alpha] < 0.95 * errors[0.0]  # α = 0 is plain RTN
        H_held = _hessian(X_held)
        rtn = sum(output_error(fake_quantize_weight(W, spec) - W, H_held) for W in weights)
        awq = sum(output_error(fake_quantize_weight(W * s, spec) / s - W, H_held) for W in weights)
        assert awq < 0.95 * rtn, (key, awq, rtn)


def test_awq_clipping_lowers_the_output_error(layer2_inputs):
    layer, inputs = layer2_inputs
    spec = lowbit.W3A16.weights
    X, X_held = inputs["down"]
    W = layer.mlp.down_proj.weight
    lo, hi = awq_clip_ranges(W, _hessian(X), spec)
    clipped = quantize_in_range(W, spec, lo, hi).dequantize()
    H_held = _hessian(X_held)
    assert output_error(clipped - W, H_held) < 0.95 * output_error(fake_quantize_weight(W, spec) - W, H_held)


def test_awq_scale_is_one_without_activations():
    mean = torch.tensor([0.0, 1.0, 4.0, 0.0])
    s = awq_scale(mean, 0.5)
    assert torch.isfinite(s).all() and s[0] == 1 and s[3] == 1 and s[2] / s[1] == pytest.approx(2.0)


def test_awq_refuses_non_integer_weights():
    with pytest.raises(LowbitError, match="integer weights"):
        awq_search([torch.randn(4, 8)], torch.eye(8), torch.ones(8), lowbit.NF4.weights)


def test_smoothquant_flattens_the_activation_outliers_and_lowers_w8a8_error(layer2_inputs):
    layer, inputs = layer2_inputs
    X, X_held = inputs["down"]
    weights = [layer.mlp.down_proj.weight]
    act_max = X.abs().amax(0)
    s = smoothquant_scale(act_max, weight_column_max(weights), 0.5)
    ratio = lambda m: float(m.max() / m.median())  # noqa: E731 — how far the largest channel stands out
    assert ratio(act_max) > 20, ratio(act_max)  # the outliers this is about
    assert ratio((X / s).abs().amax(0)) < ratio(act_max) / 3  # 113 → 30 on this layer
    w, a = lowbit.W8A8.weights, lowbit.W8A8.activations
    ones = torch.ones_like(s)
    assert w8a8_output_error(X_held, weights, s, w, a) < 0.7 * w8a8_output_error(X_held, weights, ones, w, a)


def test_smoothquant_scale_guards_zero_channels():
    s = smoothquant_scale(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 3.0]), 0.5)
    assert s.tolist() == [1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def four_layers(first_layers):
    return first_layers(4)


@pytest.fixture(scope="module")
def fp4_stats(four_layers, eval_tokens):
    return reference_stats(four_layers, eval_tokens, SHORT)


def test_awq_beats_rtn_end_to_end(four_layers, eval_tokens, fp4_stats, calib):
    rtn = evaluate_tokens(lowbit.quantize(four_layers, lowbit.W3A16), eval_tokens, fp4_stats, SHORT)
    q = lowbit.quantize(four_layers, lowbit.W3A16, method=lowbit.AWQ(), calib=calib)
    awq = evaluate_tokens(q, eval_tokens, fp4_stats, SHORT)
    assert awq.kl < 0.8 * rtn.kl and awq.top1 > rtn.top1
    details = q.lowbit_info.details
    assert len(details["scales"]) == 4 * 3 and len(details["skipped_scales"]) == 4  # o_proj: GQA
    assert all("grouped-query" in r for r in details["skipped_scales"].values())
    assert q.lowbit_info.method["name"] == "awq"


def test_smoothquant_beats_naive_w8a8_end_to_end(four_layers, eval_tokens, fp4_stats, calib):
    naive = evaluate_tokens(lowbit.quantize(four_layers, lowbit.W8A8), eval_tokens, fp4_stats, SHORT)
    q = lowbit.quantize(four_layers, lowbit.W8A8, method=lowbit.SmoothQuant(gptq=lowbit.GPTQ()), calib=calib)
    smooth = evaluate_tokens(q, eval_tokens, fp4_stats, SHORT)
    assert smooth.kl < 0.6 * naive.kl
    assert q.lowbit_info.method["name"] == "smoothquant+gptq"


def test_static_activation_scales_round_trip(four_layers, calib, tmp_path, eval_tokens):
    q = lowbit.quantize(four_layers, lowbit.W8A8_STATIC, method=lowbit.SmoothQuant(), calib=calib[:2])
    layer = q.model.layers[1].mlp.down_proj
    assert layer.input_scale.shape == (1,) and layer.input_scale.item() > 0
    x = torch.randn(3, layer.in_features) * 50
    y = layer(x)  # saturates at the calibrated range instead of rescaling per call
    reference = torch.nn.functional.linear(x.clamp(-127 * layer.input_scale, 127 * layer.input_scale),
                                           layer.weight.dequantize())
    assert torch.allclose(y, reference, rtol=0.05, atol=0.05 * reference.abs().max())
    lowbit.save(q, tmp_path / "static")
    loaded = lowbit.load(tmp_path / "static")
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.input_scale, layer.input_scale)
    tokens = eval_tokens[:64][None]
    with torch.inference_mode():
        assert torch.allclose(loaded(tokens).logits, q(tokens).logits)


@pytest.mark.parametrize("scheme, method, message", [
    (lowbit.W4A16, lowbit.SmoothQuant(), "leaves them in float"),
    (lowbit.W8A8, lowbit.AWQ(), "also quantises activations"),
    (lowbit.NF4, lowbit.AWQ(), "integer weights"),
    (lowbit.FP8, lowbit.SmoothQuant(gptq=lowbit.GPTQ()), "integer weights"),
    (lowbit.W8A8_STATIC, lowbit.RTN(), "calibrated by SmoothQuant"),
])
def test_mismatched_method_and_scheme_are_refused(four_layers, calib, scheme, method, message):
    with pytest.raises(LowbitError, match=message):
        lowbit.quantize(four_layers, scheme, method=method, calib=calib)


def test_awq_needs_calibration(four_layers):
    with pytest.raises(LowbitError, match="AWQ needs calibration data"):
        lowbit.quantize(four_layers, lowbit.W4A16, method=lowbit.AWQ())


@pytest.mark.parametrize("propagate", ["float", "quantized"])
def test_propagate_chooses_what_later_layers_calibrate_on(four_layers, calib, propagate):
    """With propagate="float" the last layer's SmoothQuant scale comes from the float model's own activations
    (one pass per layer); with "quantized" from the activations behind the quantised earlier layers."""
    mlp = four_layers.model.layers[3].mlp
    seen = []
    hook = mlp.gate_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().amax(dim=(0, 1))))
    with torch.inference_mode():
        four_layers(calib)
    hook.remove()
    s = smoothquant_scale(seen[0], weight_column_max([mlp.gate_proj.weight, mlp.up_proj.weight]), 0.5)
    method = lowbit.SmoothQuant(propagate=propagate, calib_dtype="float32")
    record = lowbit.quantize(four_layers, lowbit.W8A8, method=method, calib=calib).lowbit_info.details["scales"]
    got = record["model.layers.3.mlp.gate_proj+mlp.up_proj"]
    same = all(abs(got[k] - float(v)) <= 1e-4 * abs(float(v)) for k, v in (("scale_max", s.max()),
                                                                          ("scale_min", s.min())))
    assert same == (propagate == "float"), (got, float(s.min()), float(s.max()))


def test_propagate_is_checked():
    with pytest.raises(LowbitError, match="propagate must be one of float, quantized"):
        lowbit.AWQ(propagate="fp32")
