"""A quantised output projection (``Scheme.lm_head`` / ``--lm-head``): the tied head is untied, the
embedding kept float, and every checkpoint format carries the head's codes to the same logits."""

import json

import pytest
import torch

import lowbit
from lowbit.algorithms import GPTQ, rtn_quantize
from lowbit.errors import LowbitError
from lowbit.io import load_compressed_tensors, load_gptq, save_compressed_tensors, save_gptq
from lowbit.nn import QuantLinear, quantized_modules
from lowbit.scheme import QuantSpec, Scheme, scheme_with

W4_G32 = Scheme(QuantSpec("int", 4, "group", 32), name="W4A16")
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("head", ["int8", "same"])
def test_the_head_is_rounded_untied_and_the_float_model_left_alone(tiny, head):
    q = lowbit.quantize(tiny, scheme_with(W4_G32, lm_head=head), progress=False)
    spec = QuantSpec("int", 8, "channel") if head == "int8" else W4_G32.weights
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.weight.spec == spec and q.lm_head.activations is None
    assert "lm_head" in quantized_modules(q) and len(quantized_modules(q)) == 15
    expected = rtn_quantize(tiny.lm_head.weight.detach(), spec).dequantize()
    assert torch.equal(q.lm_head.weight.dequantize(), expected)
    assert torch.equal(q.model.embed_tokens.weight, tiny.model.embed_tokens.weight)  # the embedding stays float
    assert not q.config.tie_word_embeddings
    assert tiny.config.tie_word_embeddings and tiny.lm_head.weight is tiny.model.embed_tokens.weight
    # the same body with a float head whose weight is the head's decoded codes: the same logits
    body = lowbit.quantize(tiny, W4_G32, progress=False)
    body.config.tie_word_embeddings = False
    body.lm_head = torch.nn.Linear(64, 256, bias=False)
    body.lm_head.weight.data = expected
    torch.testing.assert_close(logits(q), logits(body), rtol=0, atol=1e-5)


def test_gptq_quantises_the_body_and_rounds_the_head(tiny):
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    q = lowbit.quantize(tiny, scheme_with(W4_G32, lm_head="int8"), GPTQ(), calib=calib, progress=False)
    assert isinstance(q.lm_head, QuantLinear)
    assert torch.equal(q.lm_head.weight.dequantize(),
                       rtn_quantize(tiny.lm_head.weight.detach(), QuantSpec("int", 8, "channel")).dequantize())


def test_a_head_selected_twice_or_missing_is_refused(tiny):
    twice = scheme_with(W4_G32, lm_head="int8").replace(ignore=())
    with pytest.raises(LowbitError, match="selects lm_head among its linear layers and also sets lm_head"):
        lowbit.quantize(tiny, twice, progress=False)
    body_only = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(LowbitError, match="Sequential has no linear output projection"):
        lowbit.quantize(body_only, scheme_with(W4_G32, lm_head="int8"), progress=False)


def test_native_round_trip(tiny, tmp_path):
    q = lowbit.quantize(tiny, scheme_with(W4_G32, lm_head="int8"), progress=False)
    back = lowbit.load(lowbit.save(q, tmp_path / "n"))
    assert isinstance(back.lm_head, QuantLinear) and not back.config.tie_word_embeddings
    assert torch.equal(back.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    assert torch.equal(logits(q), logits(back))


def test_compressed_tensors_round_trip_and_transformers_reads_it(tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    q = lowbit.quantize(tiny, scheme_with(W4_G32, lm_head="int8"), progress=False)
    out = save_compressed_tensors(q, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    targets = [t for g in config["quantization_config"]["config_groups"].values() for t in g["targets"]]
    assert "lm_head" in targets
    assert torch.equal(logits(q), logits(load_compressed_tensors(out)))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(hf), logits(q), rtol=1e-5, atol=1e-5)


def test_gptq_checkpoint_flags_the_head(tiny, tmp_path):
    q = lowbit.quantize(tiny, scheme_with(W4_G32, lm_head="same"), progress=False)
    out = save_gptq(q, tmp_path / "g")
    assert json.loads((out / "quantize_config.json").read_text())["lm_head"] is True
    back = load_gptq(out)
    assert isinstance(back.lm_head, QuantLinear)
    assert torch.equal(logits(q), logits(back))
    plain = save_gptq(lowbit.quantize(tiny, W4_G32, progress=False), tmp_path / "plain")
    assert json.loads((plain / "quantize_config.json").read_text())["lm_head"] is False
    with pytest.raises(LowbitError, match="layer lm_head is quantised as .* a GPTQ checkpoint holds one scheme"):
        save_gptq(lowbit.quantize(tiny, scheme_with(W4_G32, lm_head="int8"), progress=False), tmp_path / "mixed")


def test_where_the_head_is_not_supported_yet_the_refusal_names_it(tiny, tmp_path):
    from lowbit.planner import plan_bits
    from lowbit.streaming import quantize_streaming
    from lowbit.training import prepare_qat

    scheme = scheme_with(W4_G32, lm_head="int8")
    with pytest.raises(LowbitError, match="QAT trains the decoder layers' linears and leaves lm_head float"):
        prepare_qat(tiny, scheme)
    with pytest.raises(LowbitError, match="the bit planner leaves lm_head float"):
        plan_bits(tiny, scheme, torch.randint(0, 256, (2, 8)), target_bpw=4.0)
    with pytest.raises(LowbitError, match="streaming quantises decoder layers only; .* also quantises lm_head"):
        quantize_streaming(None, tmp_path / "s", scheme)
