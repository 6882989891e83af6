"""The layer-by-layer calibration pipeline and GPTQ on the real default model (small calibration).

GPTQ runs on the model's first six decoder layers (with its own embeddings, final norm
and head), so that the suite stays fast on two cores; the full model and the protocol's
128 × 512 calibration set are measured by bench/gptq.py.
"""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lowbit
from lowbit.calibration.pipeline import capture_first_layer_inputs, run_layer
from lowbit.errors import LowbitError
from lowbit.eval import EvalConfig, evaluate_tokens, reference_stats
from lowbit.nn import quantized_modules
from lowbit.sequential import calibration_dtype

SHORT = EvalConfig(window=512, max_windows=2, kl_windows=1)


@pytest.fixture(scope="module")
def calib(default_tokenizer):
    return lowbit.calibration_set("pydoc-calib", n=8, seqlen=256, tokenizer=default_tokenizer)


@pytest.fixture(scope="module")
def small_model(first_layers):
    return first_layers(6)


@pytest.fixture(scope="module")
def fp_stats(small_model, eval_tokens):
    return reference_stats(small_model, eval_tokens, SHORT)


def test_captured_inputs_reproduce_the_model(default_model, calib):
    """Running the decoder layers on the captured inputs gives the model's own hidden states."""
    name, layers, inputs = capture_first_layer_inputs(default_model, calib[:2], batch_size=2)
    hidden = inputs
    for layer in layers:
        hidden = type(inputs)(run_layer(layer, hidden), inputs.kwargs)
    with torch.inference_mode():
        expected = default_model.model(input_ids=calib[:2], use_cache=False, output_hidden_states=True)
    # the model's last hidden state is normed; its second-to-last entry is the raw layer output
    assert torch.allclose(default_model.model.norm(hidden.hidden[0]), expected.last_hidden_state, atol=1e-4)
    assert len(layers) == 30 and name == "model.layers"


@pytest.fixture(scope="module")
def rtn(small_model, eval_tokens, fp_stats):
    """Round-to-nearest's fidelity, the bar each GPTQ variant must clear."""
    return evaluate_tokens(lowbit.quantize(small_model, lowbit.W4A16_ASYM), eval_tokens, fp_stats, SHORT)


@pytest.fixture(scope="module")
def gptq_run(small_model, eval_tokens, fp_stats, calib):
    """``gptq_run(method)``: the small model quantised at W4A16_ASYM by ``method``, and its short evaluation, made
    once per method as it resolves on this machine (its "auto" calibration dtype named: the default method's run
    is the dtype test's run at that dtype)."""
    done = {}

    def run(method: lowbit.GPTQ):
        dtype = str(calibration_dtype(method.calib_dtype, torch.device("cpu"))).removeprefix("torch.")
        method = dataclasses.replace(method, calib_dtype=dtype)
        if method not in done:
            q = lowbit.quantize(small_model, lowbit.W4A16_ASYM, method=method, calib=calib, progress=False)
            done[method] = q, evaluate_tokens(q, eval_tokens, fp_stats, SHORT)
        return done[method]

    return run


@pytest.mark.parametrize("method", [lowbit.GPTQ(), lowbit.GPTQ(static_groups=False, true_sequential=False),
                                    lowbit.GPTQ(act_order=False)],
                         ids=["true-sequential-static-act-order", "act-order-g-idx-batched", "natural-order"])
def test_gptq_beats_rtn_on_the_default_model(gptq_run, rtn, method):
    q, gptq = gptq_run(method)
    # A six-layer model is no language model (its perplexity is astronomical), but its
    # fidelity to the float six-layer model is well defined: KL and top-1 must improve.
    assert gptq.kl < 0.75 * rtn.kl and gptq.top1 > rtn.top1
    details = q.lowbit_info.details
    assert len(details["layer_errors"]) == 6 and all(0 < e < 0.1 for e in details["layer_errors"])
    assert details["fallbacks"] == [] and details["calibration_tokens"] == 8 * 256
    assert len(quantized_modules(q)) == 6 * 7
    has_g_idx = q.get_submodule("model.layers.0.mlp.down_proj").weight.g_idx is not None
    assert has_g_idx == (method.act_order and not method.static_groups)


def test_unreached_linear_falls_back_to_rtn(first_layers, calib):
    model = first_layers(5)
    model.model.layers[4].mlp.unused = nn.Linear(576, 64, bias=False)  # like an expert no token picks
    q = lowbit.quantize(model, lowbit.W4A16, method=lowbit.GPTQ(), calib=calib[:2])
    assert q.lowbit_info.details["fallbacks"] == ["model.layers.4.mlp.unused"]
    assert isinstance(q.model.layers[4].mlp.unused, lowbit.nn.QuantLinear)
    assert torch.isfinite(q.model.layers[4].mlp.unused.weight.dequantize()).all()


def test_gptq_refusals(default_model, calib):
    with pytest.raises(LowbitError, match="GPTQ needs calibration data"):
        lowbit.quantize(default_model, lowbit.W4A16, method=lowbit.GPTQ())
    with pytest.raises(LowbitError, match="GPTQ quantises integer weights; scheme NF4 uses nf4"):
        lowbit.quantize(default_model, lowbit.NF4, method=lowbit.GPTQ(), calib=calib)
    with pytest.raises(LowbitError, match="GPTQ damping must lie in"):
        lowbit.GPTQ(damp=-0.1)


def test_linears_reading_one_tensor_are_found_by_probing_not_by_name(default_model, calib):
    from lowbit.models import select_linears
    from lowbit.sequential import shared_input_groups

    _, layers, probe = capture_first_layer_inputs(default_model, calib[:1, :16], 1)
    prefix = "model.layers.3."
    linears = {n[len(prefix):]: m for n, m in select_linears(default_model, lowbit.W4A16.targets, lowbit.W4A16.ignore).items()
               if n.startswith(prefix)}
    groups = shared_input_groups(layers[3], probe, linears)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_calibration_dtype_float32_and_bfloat16_give_close_results(gptq_run):
    """A bfloat16 calibration forward (activations included) quantises as well as a float32 one.

    Each run's layer errors are measured with its own Hessians, which bfloat16 activations
    change a little (most in the layer whose down_proj writes the residual stream's
    massive activation: 7 % here), so they agree loosely; fidelity to the float model is
    the like-for-like comparison.
    """
    errors, kl = {}, {}
    for dtype in ("float32", "bfloat16"):
        q, result = gptq_run(lowbit.GPTQ(calib_dtype=dtype))
        details = q.lowbit_info.details
        assert details["calibration_dtype"] == dtype
        errors[dtype] = torch.tensor(details["layer_errors"])
        kl[dtype] = result.kl
    assert torch.allclose(errors["bfloat16"], errors["float32"], rtol=0.15)
    assert kl["bfloat16"] < 1.1 * kl["float32"]


def test_bfloat16_pass_leaves_the_float_layer_as_it_was(small_model):
    """The bfloat16 copies are gone afterwards: untouched parameters are the originals again."""
    from lowbit.sequential import _precision

    layer = copy.deepcopy(small_model.model.layers[0])
    before = {n: p.data for n, p in layer.named_parameters()}
    with _precision(layer, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
        layer.mlp.down_proj.weight.data = torch.zeros(576, 1536, dtype=torch.bfloat16)  # as a quantised weight is
    for name, param in layer.named_parameters():
        if name == "mlp.down_proj.weight":
            assert param.dtype == torch.bfloat16 and not param.any()
        else:
            assert param.dtype == torch.float32 and param.data_ptr() == before[name].data_ptr()


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _toy_inputs(chunks):
    from lowbit.calibration.pipeline import LayerInputs

    gen = torch.Generator().manual_seed(0)
    return LayerInputs([torch.randn(2, 3, 6, generator=gen) for _ in range(chunks)], [{} for _ in range(chunks)])


def test_staged_pass_pauses_every_chunk_before_each_stage_and_matches_one_batch():
    from lowbit.calibration.pipeline import run_layer_staged

    toy, inputs = _Toy(), _toy_inputs(4)
    events = []

    def finish(stage):
        assert sum(1 for e in events if e == ("observe", stage)) == 4  # every chunk arrived first
        events.append(("finish", stage))
        getattr(toy, stage).weight.data *= 0.5  # later chunks and stages see the change

    outputs = run_layer_staged(toy, inputs, {"a": toy.a, "b": toy.b}, stage=lambda n: n,
                               observe=lambda s, x: events.append(("observe", s)), finish=finish)
    assert [e for e in events if e[0] == "finish"] == [("finish", "a"), ("finish", "b")]
    assert all(h is None for h in inputs.hidden)  # consumed
    with torch.no_grad():  # every chunk went through both halved weights: a plain forward now agrees
        for out, h in zip(outputs, _toy_inputs(4).hidden):
            assert torch.allclose(out, toy(h), atol=1e-6)


def test_staged_pass_error_unwinds_paused_chunks_and_removes_hooks():
    from lowbit.calibration.pipeline import run_layer_staged

    toy = _Toy()

    def finish(stage):
        raise LowbitError(f"cannot finish {stage}")

    with pytest.raises(LowbitError, match="cannot finish a"):
        run_layer_staged(toy, _toy_inputs(3), {"a": toy.a, "b": toy.b}, stage=lambda n: n,
                         observe=lambda s, x: None, finish=finish)
    assert not toy.a._forward_pre_hooks and not toy.b._forward_pre_hooks
    toy(torch.zeros(1, 6))  # usable afterwards
