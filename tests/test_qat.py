"""Quantisation-aware training and QLoRA on the default model cut to its first layers: preparation from RTN and
GPTQ, conversion equal to the fake-quant model, exact resumption, divergence and empty text, and the CLI."""

import json
import re

import pytest
import torch

import lowbit
from lowbit.cli import cli
from lowbit.nn import FakeQuantLinear, LoRALinear, QuantLinear, fake_quant_modules, quantized_modules
from lowbit.training import read_checkpoint_state

TINY = lowbit.QAT(steps=4, batch_size=2, seqlen=32, dtype="float32", lr=1e-4, scale_lr=1e-3)


@pytest.fixture(scope="module")
def train_tokens(default_tokenizer):
    return lowbit.calibration.tokenize(default_tokenizer, lowbit.load_text("pydoc-calib"))[:4096]


@pytest.fixture(scope="module")
def ids(default_tokenizer):
    return lowbit.calibration.tokenize(default_tokenizer, lowbit.load_text("pydoc-eval"))[:48][None]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_rtn_start_is_the_rtn_model(first_layers, ids):
    model = first_layers(2)
    student = lowbit.prepare_qat(model, lowbit.W3A16)
    assert len(fake_quant_modules(student)) == 14
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".weight", ".scale", ".zero_point")) and "proj" in n for n in trainable)
    rtn = lowbit.quantize(model, lowbit.W3A16)
    for name, module in fake_quant_modules(student).items():
        assert torch.equal(module.fake_weight(), quantized_modules(rtn)[name].weight.dequantize())
    torch.testing.assert_close(_logits(student, ids), _logits(rtn, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [lowbit.GPTQ(), lowbit.AWQ()], ids=["gptq", "awq"])
def test_calibrated_start_reproduces_the_methods_codes(first_layers, default_tokenizer, ids, method):
    model = first_layers(1)
    calib = lowbit.calibration_set(n=4, seqlen=64, tokenizer=default_tokenizer)
    student = lowbit.prepare_qat(model, lowbit.W2A16, init=method, calib=calib, progress=False)
    quantized = lowbit.quantize(model, lowbit.W2A16, method=method, calib=calib, progress=False)
    for name, module in fake_quant_modules(student).items():
        assert torch.equal(module.fake_weight(), quantized_modules(quantized)[name].weight.dequantize()), name
    assert student.lowbit_qat["init"]["name"] == method.to_dict()["name"]
    # AWQ's scales folded into the norms come along: the whole model starts where the method left it
    torch.testing.assert_close(_logits(student, ids), _logits(quantized, ids), rtol=1e-4, atol=1e-4)


def test_train_then_convert_equals_fake_quant(first_layers, train_tokens, ids):
    model = first_layers(2)
    student = lowbit.prepare_qat(model, lowbit.W4A16)
    before = {n: m.scale.detach().clone() for n, m in fake_quant_modules(student).items()}
    report = lowbit.train_qat(student, train_tokens, TINY, teacher=model, progress=False)
    assert len(report.losses) == 4 and all(l > 0 for l in report.losses)
    assert report.tokens == 4 * 2 * 32 and report.tokens_per_second > 0
    assert any(not torch.equal(before[n], m.scale) for n, m in fake_quant_modules(student).items())
    quantized = lowbit.convert(student)
    assert not fake_quant_modules(quantized) and len(quantized_modules(quantized)) == 14
    for name, module in fake_quant_modules(student).items():
        assert torch.equal(quantized_modules(quantized)[name].weight.dequantize(), module.fake_weight())
    from lowbit.kernels import dispatch

    layer = next(iter(quantized_modules(quantized).values()))
    assert dispatch.choose(layer.weight, None, torch.device("cpu"), ids.shape[1]) is not dispatch.REFERENCE
    torch.testing.assert_close(_logits(quantized, ids), _logits(student, ids), rtol=1e-3, atol=1e-3)
    assert quantized.lowbit_info.method["name"] == "qat"
    assert quantized.lowbit_info.method["training"]["steps"] == 4


def test_resumed_run_repeats_the_uninterrupted_one(first_layers, train_tokens, tmp_path):
    model = first_layers(1)
    config = TINY.replace(checkpoint_every=2)
    whole = lowbit.prepare_qat(model, lowbit.W3A16)
    full = lowbit.train_qat(whole, train_tokens, config, teacher=model, checkpoint_dir=tmp_path / "a", progress=False)
    first = lowbit.prepare_qat(model, lowbit.W3A16)
    cut = lowbit.train_qat(first, train_tokens, config, teacher=model, checkpoint_dir=tmp_path / "b",
                           stop_after=2, progress=False)
    assert read_checkpoint_state(tmp_path / "b")["step"] == 2
    again = lowbit.prepare_qat(model, lowbit.W3A16)
    rest = lowbit.train_qat(again, train_tokens, config, teacher=model, checkpoint_dir=tmp_path / "b", resume=True,
                            progress=False)
    assert rest.resumed_from == 2
    assert cut.losses == full.losses[:2]
    assert rest.losses == full.losses  # the same curve, to the last bit
    for (name, a), (_, b) in zip(whole.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(lowbit.LowbitError, match="already holds a checkpoint"):
        lowbit.train_qat(again, train_tokens, config, teacher=model, checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(lowbit.LowbitError, match="another training config"):
        lowbit.train_qat(again, train_tokens, config.replace(lr=3e-4), teacher=model, checkpoint_dir=tmp_path / "b",
                         resume=True, progress=False)


@pytest.mark.parametrize("qlora", [True, False])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(first_layers, train_tokens, tmp_path, qlora):
    """Adapters have no clipping: a huge learning rate makes the loss NaN. Fake-quantised weights clip, so there it
    is the trained parameters (or AdamW's step) that overflow; either way training stops in one sentence."""
    model = first_layers(1)
    student = lowbit.prepare_qlora(model, rank=2) if qlora else lowbit.prepare_qat(model, lowbit.W3A16)
    lr = 1e30 if qlora else 1e38
    config = TINY.replace(lr=lr, scale_lr=lr, checkpoint_every=1, steps=12, warmup=0 if qlora else 9)
    with pytest.raises(lowbit.LowbitError, match=rf"training diverged at step \d+: .* learning rate {re.escape(f'{lr:g}')}.*"
                                                 r"last good checkpoint \(step \d+\) is kept"):
        lowbit.train_qat(student, train_tokens, config, teacher=model, checkpoint_dir=tmp_path, progress=False)
    state = read_checkpoint_state(tmp_path)
    assert state is not None and state["step"] >= 1
    assert all(torch.isfinite(torch.tensor(state["losses"])))


def test_empty_or_short_text_is_refused_before_training(first_layers, tmp_path):
    model = first_layers(1)
    student = lowbit.prepare_qat(model, lowbit.W3A16)
    with pytest.raises(lowbit.LowbitError, match="the training text is empty"):
        lowbit.train_qat(student, "  \n", TINY, teacher=model, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(lowbit.LowbitError, match="fewer than one sequence of 32"):
        lowbit.train_qat(student, torch.arange(10), TINY, teacher=model, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    with pytest.raises(lowbit.LowbitError, match="needs the float model as teacher"):
        lowbit.train_qat(student, torch.arange(100), TINY)


def test_qlora_trains_adapters_only_and_merges(first_layers, train_tokens, tmp_path, ids):
    model = first_layers(1)
    student = lowbit.prepare_qlora(model, lowbit.NF4, rank=4)
    adapters = {n: m for n, m in student.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapters) == 7
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in adapters for ab in "AB"}
    torch.testing.assert_close(_logits(student, ids), _logits(lowbit.quantize(model, lowbit.NF4), ids))
    report = lowbit.train_qat(student, train_tokens, TINY.replace(loss="next-token", lr=1e-3), progress=False)
    assert all(m.lora_B.abs().sum() > 0 for m in adapters.values())
    memory = report.memory
    assert memory["frozen_base_bytes"] > 0 and memory["trainable_bytes"] == sum(
        p.numel() * 4 for n, p in student.named_parameters() if p.requires_grad)
    assert memory["optimizer_bytes"] >= 2 * memory["trainable_bytes"]
    kept = lowbit.convert(student, merge=False)
    assert len([m for m in kept.modules() if isinstance(m, LoRALinear)]) == 7
    merged = lowbit.convert(student)
    assert all(isinstance(m, QuantLinear) and m.spec.format == "nf4" for m in quantized_modules(merged).values())
    from lowbit.tensor import quantize_weight

    for name, module in adapters.items():
        weight = module.base.weight.dequantize() + module.delta()
        assert torch.equal(quantized_modules(merged)[name].weight.dequantize(),
                           quantize_weight(weight, module.base.spec).dequantize())
    path = lowbit.save_adapters(student, tmp_path / "adapters")
    assert (path / "adapters.safetensors").is_file() and json.loads((path / "adapters.json").read_text())["adapters"]


@pytest.fixture(scope="module")
def tiny_dir(first_layers, default_tokenizer, tmp_path_factory):
    """The default model cut to one layer, saved as a Hugging Face directory the CLI can load."""
    path = tmp_path_factory.mktemp("one_layer")
    first_layers(1).save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


def _run(*args):
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_train_qat_end_to_end(tiny_dir, tmp_path):
    code, output = _run("train-qat", tiny_dir, "--scheme", "W4A16", "--steps", "2", "--batch-size", "1",
                        "--seqlen", "32", "--dtype", "float32", "--max-windows", "1", "--kl-windows", "1",
                        "--window", "256", "--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "q",
                        "--json", tmp_path / "r.json")
    assert code == 0, output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["training"]["losses"]) == 2 and report["training"]["tokens_per_second"] > 0
    assert report["before"]["kl"] is not None and report["kl"] is not None
    assert read_checkpoint_state(tmp_path / "ck")["step"] == 2
    loaded = lowbit.load(tmp_path / "q")
    assert len(quantized_modules(loaded)) == 7
    assert json.loads((tmp_path / "q" / "lowbit.json").read_text())["method"]["name"] == "qat"


def test_cli_refuses_bad_input_in_one_sentence(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, output = _run("train-qat", tiny_dir, "--text", empty, "--json", tmp_path / "r.json")
    assert code == 1 and "error: text file" in output and "is empty" in output and "Traceback" not in output
    code, output = _run("train-qat", tiny_dir, "--qlora", "--steps", "8", "--batch-size", "1", "--seqlen", "32",
                        "--lr", "1e30", "--dtype", "float32", "--checkpoint-every", "1",
                        "--checkpoint-dir", tmp_path / "ck", "--no-eval", "--json", tmp_path / "r.json")
    assert code == 1 and "error: training diverged at step" in output and "last good checkpoint" in output, output
    assert read_checkpoint_state(tmp_path / "ck")["step"] >= 1
    code, output = _run("train-qat", tiny_dir, "--steps", "2", "--tokens", "100", "--json", tmp_path / "r.json")
    assert code == 1 and "pass one" in output


def test_gradient_accumulation_equals_one_bigger_batch(first_layers, train_tokens):
    model = first_layers(1)
    config = TINY.replace(steps=2, seqlen=16)
    one = lowbit.prepare_qat(model, lowbit.W4A16)
    two = lowbit.prepare_qat(model, lowbit.W4A16)
    a = lowbit.train_qat(one, train_tokens, config, teacher=model, progress=False)
    b = lowbit.train_qat(two, train_tokens, config.replace(batch_size=1, grad_accum=2), teacher=model, progress=False)
    assert a.tokens == b.tokens
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
