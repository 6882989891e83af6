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


@pytest.mark.parametrize("train", ["all", "quant-params"])
def test_resumed_run_repeats_the_uninterrupted_one(first_layers, train_tokens, tmp_path, train):
    model = first_layers(1)
    config = TINY.replace(checkpoint_every=2, train=train)
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
    # a checkpoint from before scale_grad / train existed was trained with LSQ gradients, all parameters
    trainer = tmp_path / "b" / "checkpoint" / "trainer.json"
    state = json.loads(trainer.read_text())
    del state["config"]["scale_grad"], state["config"]["train"]
    trainer.write_text(json.dumps(state))
    with pytest.raises(lowbit.LowbitError, match="another training config"):
        lowbit.train_qat(again, train_tokens, config, teacher=model, checkpoint_dir=tmp_path / "b", resume=True,
                         progress=False)
    if train == "all":
        legacy = config.replace(scale_grad="lsq")
        done = lowbit.train_qat(again, train_tokens, legacy, teacher=model, checkpoint_dir=tmp_path / "b", resume=True,
                                progress=False)
        assert done.resumed_from == config.steps


@pytest.mark.parametrize("qlora", [True, False])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(first_layers, train_tokens, tmp_path, qlora):
    """Adapters have no clipping: a huge learning rate makes the loss NaN. Fake-quantised weights clip, so there it
    is the trained parameters (or AdamW's step) that overflow; either way training stops in one sentence. (LSQ
    gradients: with exact ones the wrecked parameters, their signs alternating, stay just below float32's maximum
    for these 12 steps — the loss is large but finite, and nothing diverges to report.)"""
    model = first_layers(1)
    student = lowbit.prepare_qlora(model, rank=2) if qlora else lowbit.prepare_qat(model, lowbit.W3A16)
    lr = 1e30 if qlora else 1e38
    config = TINY.replace(lr=lr, scale_lr=lr, checkpoint_every=1, steps=12, warmup=0 if qlora else 9,
                          scale_grad="lsq")
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
                        "--json", tmp_path / "r.json", "--scale-grad", "exact", "--train", "quant-params")
    assert code == 0, output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["training"]["config"]["scale_grad"] == "exact"
    assert report["training"]["config"]["train"] == "quant-params"
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


# -- exact gradients of the quantisation parameters (EfficientQAT's E2E-QP) ---------------------------

@pytest.mark.parametrize("scheme", ["W2A16", "W3A16", "W4A16", "NF4"])
@pytest.mark.parametrize("shape", [(5, 70), (16, 128), (3, 200)])
def test_exact_scale_gradient_is_that_of_fixed_codes(scheme, shape):
    """Exact mode: the gradients of scale and zero point are autograd's of (q − z) · s with q detached, clipped
    elements included; the latent weight's gradient stays the straight-through one of LSQ mode."""
    from lowbit.nn.fake_quant import _fake_and_codes, _per_column, decode_codes, stored_scale

    generator = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    spec = lowbit.scheme.get_scheme(scheme).spec_for("x")
    linear = torch.nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.randn(shape, generator=generator))
    module = FakeQuantLinear.from_linear(linear, spec)
    with torch.no_grad():  # move the scales off RTN's, so that some elements clip and some codes are off-centre
        module.scale.mul_(torch.empty_like(module.scale).uniform_(0.6, 1.4, generator=generator))
        if module.zero_point is not None:
            module.zero_point.add_(torch.empty_like(module.zero_point).uniform_(-0.4, 0.4, generator=generator))
    grad_out = torch.randn(shape, generator=generator)

    def grads(scale_grad: str):
        module.zero_grad(set_to_none=True)
        out, codes = _fake_and_codes(module.weight, module.scale, module.zero_point, spec, None, scale_grad)
        (out * grad_out).sum().backward()
        zero = None if module.zero_point is None else module.zero_point.grad.clone()
        return out.detach(), codes, module.weight.grad.clone(), module.scale.grad.clone(), zero

    out, codes, grad_w, grad_s, grad_z = grads("exact")
    _, _, lsq_w, lsq_s, _ = grads("lsq")
    torch.testing.assert_close(grad_w, lsq_w, rtol=0, atol=0)
    # the reference: plain autograd of the decode with the codes as constants
    scale = module.scale.detach().clone().requires_grad_(True)
    zero = None if module.zero_point is None else module.zero_point.detach().clone().requires_grad_(True)
    ref = decode_codes(codes.detach(), scale, zero, spec)
    assert torch.equal(ref.detach(), out)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(grad_s, scale.grad, rtol=1e-5, atol=1e-5)
    if spec.format == "int":  # and by hand: Σ g · (q − z) per group, −s · Σ g
        group = spec.group_size_for(shape[1], shape[0])
        z_col = 0 if zero is None else _per_column(zero.detach().round(), shape[1], group, None)
        s_col = _per_column(stored_scale(scale, spec).detach(), shape[1], group, None)  # as stored (float16)
        by_group = torch.zeros_like(scale).index_add_(1, torch.arange(shape[1]) // group, grad_out * (codes - z_col))
        torch.testing.assert_close(grad_s, by_group, rtol=1e-5, atol=1e-5)
        if zero is not None:
            sums = torch.zeros_like(scale).index_add_(1, torch.arange(shape[1]) // group, -grad_out * s_col)
            torch.testing.assert_close(grad_z, sums, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad_z, zero.grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grad_s, lsq_s)


def test_lsq_gives_no_scale_gradient_on_the_grid_and_exact_does(first_layers, default_tokenizer, train_tokens):
    """The failure exact mode mends: from a GPTQ start the latent weights lie on the grid, so LSQ's scale and zero
    point gradients vanish, while the exact ones do not."""
    model = first_layers(1)
    calib = lowbit.calibration_set(n=4, seqlen=64, tokenizer=default_tokenizer)
    student = lowbit.prepare_qat(model, lowbit.W2A16, init=lowbit.GPTQ(), calib=calib, progress=False)
    ids = train_tokens[:64][None]
    for scale_grad, vanishes in (("lsq", True), ("exact", False)):
        for module in fake_quant_modules(student).values():
            module.scale_grad = scale_grad
        student.zero_grad(set_to_none=True)
        student(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
        largest = max(float(m.scale.grad.abs().max()) for m in fake_quant_modules(student).values())
        zero = max(float(m.zero_point.grad.abs().max()) for m in fake_quant_modules(student).values())
        weight = max(float(m.weight.grad.abs().max()) for m in fake_quant_modules(student).values())
        assert weight > 0
        assert (largest < 1e-6 * weight and zero < 1e-6 * weight) if vanishes else (largest > weight and zero > 0)


@pytest.mark.parametrize("init", ["gptq", "rtn"])
def test_quant_params_training_keeps_the_codes_and_lowers_a_fixed_batch_loss(first_layers, default_tokenizer,
                                                                              train_tokens, init):
    """train='quant-params': the packed codes after training equal the start's bit for bit, only scales and zero
    points moved; and exact-gradient steps on one fixed batch lower its distillation loss."""
    from lowbit.algorithms.qat import distillation_loss

    model = first_layers(1)
    calib = lowbit.calibration_set(n=4, seqlen=64, tokenizer=default_tokenizer) if init == "gptq" else None
    method = lowbit.GPTQ() if init == "gptq" else lowbit.RTN()
    student = lowbit.prepare_qat(model, lowbit.W2A16, init=method, calib=calib, progress=False)
    start = lowbit.convert(student)
    batch = train_tokens[:48]  # exactly one window: every step sees the same batch

    def loss_of(m):
        with torch.no_grad():
            return float(distillation_loss(m(input_ids=batch[None], use_cache=False).logits,
                                           model(input_ids=batch[None], use_cache=False).logits))

    config = lowbit.QAT(steps=8, batch_size=1, seqlen=48, dtype="float32", scale_lr=1e-3, schedule="constant",
                        scale_grad="exact", train="quant-params")
    latent = {n: m.weight.detach().clone() for n, m in fake_quant_modules(student).items()}
    report = lowbit.train_qat(student, batch, config, teacher=model, progress=False)
    assert report.trainable_params == sum(m.scale.numel() + m.zero_point.numel()
                                          for m in fake_quant_modules(student).values())
    trained = lowbit.convert(student)
    assert loss_of(trained) < 0.9 * loss_of(start), (loss_of(start), loss_of(trained), report.losses)
    moved = 0
    for name, before in quantized_modules(start).items():
        after = quantized_modules(trained)[name].weight
        assert torch.equal(after.qdata, before.weight.qdata), name  # the codes, bit for bit
        assert torch.equal(fake_quant_modules(student)[name].weight, latent[name])
        moved += not torch.equal(after.scale, before.weight.scale)
    assert moved == len(latent)
    for module in fake_quant_modules(student).values():
        assert not module.weight.requires_grad and "learned=scale+zero_point" in repr(module)


def test_qat_config_fields_round_trip_and_are_checked():
    config = lowbit.QAT(scale_grad="lsq", train="quant-params")
    assert lowbit.QAT.from_dict(config.to_dict()) == config
    assert config.to_dict()["scale_grad"] == "lsq" and config.to_dict()["train"] == "quant-params"
    with pytest.raises(lowbit.LowbitError, match="scale_grad must be one of lsq, exact"):
        lowbit.QAT(scale_grad="ste")
    with pytest.raises(lowbit.LowbitError, match="train must be one of all, quant-params"):
        lowbit.QAT(train="weights")


def test_quant_params_mode_refuses_a_qlora_model(first_layers, train_tokens):
    model = first_layers(1)
    student = lowbit.prepare_qlora(model, rank=2)
    with pytest.raises(lowbit.LowbitError, match="quant-params"):
        lowbit.train_qat(student, train_tokens, TINY.replace(train="quant-params"), teacher=model, progress=False)
