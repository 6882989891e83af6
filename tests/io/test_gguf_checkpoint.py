"""GGUF export, checked by the readers that define the format: the gguf package's GGUFReader and
quants.dequantize (llama.cpp's own Python reader), and transformers' GGUF loader end to end.

The model here is a tiny random LLaMA with a 300-token byte-level BPE tokenizer trained on the spot,
so that transformers converts the file's tokenizer in a moment; the default model's file is checked
for the tokenizer metadata only (the bench writes and evaluates the full model)."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.ggml import GGML_BLOCKS, ggml_decode, ggml_encode
from lowbit.io.gguf import _rope_rows, save_gguf
from lowbit.nn import quantized_modules

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

KINDS = tuple(GGML_BLOCKS)
REQUIRED = ("general.architecture", "general.file_type", "general.quantization_version", "llama.context_length",
            "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
            "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")


# -- the block codecs -------------------------------------------------------------------------------

def _awkward_rows(kind: str):
    """Rows of two blocks: each block random at one magnitude, or all zero, one-signed, or one outlier."""
    block = GGML_BLOCKS[kind][0]
    scale = st.sampled_from([0.0, 1e-30, 1e-8, 1e-3, 1.0, 37.0, 1e4])
    style = st.sampled_from(["normal", "negative", "positive", "outlier", "constant"])

    @st.composite
    def rows(draw):
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        parts = []
        for _ in range(2):
            s, how = draw(scale), draw(style)
            x = torch.randn(block, generator=gen) * s
            if how == "negative":
                x = -x.abs()
            elif how == "positive":
                x = x.abs()
            elif how == "outlier":
                x = x * 1e-3
                x[draw(st.integers(0, block - 1))] = s
            elif how == "constant":
                x = torch.full((block,), s)
            parts.append(x)
        return torch.cat(parts).reshape(1, -1)

    return rows()


@pytest.mark.parametrize("kind", KINDS)
def test_our_encoding_decodes_as_gguf_decodes_it_and_stays_close(kind):
    qtype = gguf.GGMLQuantizationType[kind]
    block = GGML_BLOCKS[kind][0]
    bound = {"Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q6_K": 1 / 31, "Q4_K": 1 / 7}[kind]

    @settings(max_examples=200, deadline=None)
    @given(_awkward_rows(kind))
    def check(x):
        data = ggml_encode(x, kind)
        ours = ggml_decode(data, kind)
        assert torch.equal(ours, torch.from_numpy(dequantize(data.numpy(), qtype)))
        for b in range(x.shape[1] // block):
            xb, ob = x[0, b * block:(b + 1) * block], ours[0, b * block:(b + 1) * block]
            big = float(xb.abs().max())
            if big > 1e-3:  # far from float16's subnormal scales: the error is a fraction of a step
                assert float((xb - ob).abs().max()) <= bound * big * 1.01 + 1e-6, (b, big)
            if big == 0:
                assert not ob.any()

    check()


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=512, max_size=512))
def test_our_decoder_reads_any_bytes_as_gguf_does(kind, data):
    size = GGML_BLOCKS[kind][1]
    raw = np.frombuffer(data * size, dtype=np.uint8).reshape(2, -1)  # 2 rows of 256 blocks' worth of bytes
    with np.errstate(all="ignore"):  # random float16 scales include Inf and NaN; both readers must agree on them
        theirs = dequantize(raw, gguf.GGMLQuantizationType[kind])
    ours = ggml_decode(torch.from_numpy(raw.copy()), kind)
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_bad_values_are_refused():
    with pytest.raises(LowbitError, match="float16"):
        ggml_encode(torch.full((1, 32), 1e7), "Q8_0", "w")
    with pytest.raises(LowbitError, match="NaN or Inf"):
        ggml_encode(torch.tensor([[float("nan")] * 32]), "Q4_0", "w")
    with pytest.raises(LowbitError, match="multiple of 256"):
        ggml_encode(torch.ones(2, 64), "Q6_K", "w")


# -- a tiny model with its own tokenizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.calibration import load_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([load_text("pydoc-eval")[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _ids(tok):
    return tok("def f(x):\n    return x * 2  # the quick brown fox", return_tensors="pt")["input_ids"]


def _with_float_weights(model, replace):
    """A copy of a float model with every 2-D weight w replaced by replace(name, w)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() == 2:
                p.copy_(replace(name, p))
    return out


def _transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# -- the file, read by the gguf package -------------------------------------------------------------

@pytest.mark.parametrize("scheme,kind", [("Q4_0", "Q4_0"), ("Q8_0", "Q8_0"), ("Q4_1", "Q4_1")])
def test_gguf_reader_gets_our_types_shapes_and_weights(model, tok, tmp_path, scheme, kind):
    q = lowbit.quantize(model, scheme, progress=False)
    path = save_gguf(q, tmp_path / "m.gguf", tokenizer=tok)
    reader = gguf.GGUFReader(path)
    for key in REQUIRED:
        assert reader.get_field(key) is not None, key
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[f"MOSTLY_{kind}"])
    assert reader.get_field("llama.rope.freq_base").contents() == 50000.0
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and "output_norm.weight" in tensors  # tied: token_embd is the output
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    layers = quantized_modules(q)
    assert len(tensors) == 2 + 9 * 2 and len(layers) == 14
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for layer, mod in layers.items():
        t = tensors[names.get_name(f"{layer}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == kind and list(t.shape) == [mod.in_features, mod.out_features], layer
        theirs = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type))
        ours = mod.weight.dequantize()
        if ".q_proj" in layer or ".k_proj" in layer:
            heads = 4 if ".q_proj" in layer else 2
            ours = ours[_rope_rows(ours.shape[0], heads)]
        if kind == "Q4_1":  # m = −z·s rounded to float16: within 2^-11 of z·s, plus float32 rounding
            step = mod.weight.scales().repeat_interleave(32, dim=1)
            zs = mod.weight.zero_points().float().repeat_interleave(32, dim=1) * step
            if ".q_proj" in layer or ".k_proj" in layer:
                zs, step = zs[_rope_rows(zs.shape[0], heads)], step[_rope_rows(zs.shape[0], heads)]
            err = (theirs - ours).abs()
            assert bool((err <= zs * 2**-11 + ours.abs() * 2**-22 + 2**-24).all()), layer
            assert float((err / step).max()) < 0.0074
        else:
            assert torch.equal(theirs, ours), layer


def test_tokenizer_metadata_matches_the_default_models_own_file(default_tokenizer, tmp_path):
    from lowbit.io.gguf import _write_tokenizer
    from lowbit.models.loading import default_model_path

    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    _write_tokenizer(writer, default_tokenizer, 49152, "smollm")
    writer.write_header_to_file(tmp_path / "t.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, theirs = gguf.GGUFReader(tmp_path / "t.gguf"), gguf.GGUFReader(default_model_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key


# -- end to end through transformers' GGUF loader -------------------------------------------------------

def test_transformers_and_lowbit_load_our_file_and_give_our_logits(model, tok, tmp_path, monkeypatch):
    """Lossless Q4_0 layers and a Q8_0 embedding: transformers' model must compute what ours does (this is
    what checks the q/k row permutation, the names and the hyper-parameters)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    q = lowbit.quantize(model, "Q4_0", progress=False)
    path = lowbit.save(q, tmp_path / "out", format="gguf", tokenizer=tok)
    assert path == tmp_path / "out" / "model.gguf"
    emb = q.get_input_embeddings().weight
    emb.data = ggml_decode(ggml_encode(emb, "Q8_0"), "Q8_0")  # what the file holds for it
    ids = _ids(tok)
    with torch.no_grad():
        ours = q(ids).logits
        theirs = _transformers_model(path)(ids).logits
        via_lowbit = lowbit.load_model(path)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_lowbit, ours, rtol=1e-4, atol=1e-4)
    assert lowbit.load_tokenizer(path)("the quick fox")["input_ids"] == tok("the quick fox")["input_ids"]


@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K"])
def test_a_float_model_is_encoded_with_our_k_quant(model, tok, tmp_path, kind):
    path = save_gguf(model, tmp_path / "f.gguf", tokenizer=tok, gguf_type=kind, embedding_type="F16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.ffn_down.weight"] == kind and types["blk.0.attn_q.weight"] == kind
    assert types["token_embd.weight"] == "F16"
    expected = _with_float_weights(model, lambda name, w: w.half().float() if "embed" in name
                                   else ggml_decode(ggml_encode(w, kind), kind))
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(_transformers_model(path)(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-4)


# -- refusals and faults --------------------------------------------------------------------------------

def test_what_gguf_cannot_hold_is_refused_in_one_sentence(model, tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).eval()
    with pytest.raises(LowbitError, match="LLaMA architecture; this model is 'gpt2'"):
        save_gguf(gpt2, tmp_path / "g.gguf", tokenizer=tok)
    q = lowbit.quantize(model, "W4A16", progress=False)
    with pytest.raises(LowbitError, match=r"layer model\.layers\.0\.self_attn\.q_proj is quantised as int4 sym g128 "
                                          r".*quantise with the Q4_0, Q4_1 or Q8_0 scheme"):
        save_gguf(q, tmp_path / "w.gguf", tokenizer=tok)
    with pytest.raises(LowbitError, match="carries its tokenizer"):
        save_gguf(model, tmp_path / "n.gguf")
    with pytest.raises(LowbitError, match="gguf_type 'Q5_0' is not one of"):
        save_gguf(model, tmp_path / "t.gguf", tokenizer=tok, gguf_type="Q5_0")
    assert not list(tmp_path.iterdir())
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(LowbitError, match="already exists"):
        save_gguf(model, tmp_path / "x.gguf", tokenizer=tok)
    assert (tmp_path / "x.gguf").read_bytes() == b"old"


def test_an_interrupted_write_leaves_the_previous_file_intact(model, tok, tmp_path, monkeypatch):
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    before = path.read_bytes()
    calls = {"n": 0}

    def write_then_fail(self, *args, **kwargs):
        calls["n"] += 1
        for fout in self.fout:  # half a tensor section on disk, then the process "dies"
            fout.write(b"\0" * 4096)
            fout.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(lowbit.quantize(model, "Q4_0", progress=False), path, tokenizer=tok, overwrite=True)
    assert calls["n"] == 1
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_cli_export_writes_gguf_from_a_native_checkpoint(model, tok, tmp_path):
    from click.testing import CliRunner

    from lowbit.cli import cli

    q = lowbit.quantize(model, "Q4_1", progress=False)
    lowbit.save(q, tmp_path / "native", tokenizer=tok)
    runner = CliRunner()
    out = tmp_path / "m.gguf"
    result = runner.invoke(cli, ["export", str(tmp_path / "native"), "--format", "gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q4_1", "Q8_0", "F32"}
    again = runner.invoke(cli, ["export", str(tmp_path / "native"), "--format", "gguf", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = runner.invoke(cli, ["export", str(tmp_path / "native"), "--format", "gptq", "--gguf-type", "Q6_K",
                              "--out", str(tmp_path / "g")])
    assert bad.exit_code == 1 and "--gguf-type applies to --format gguf" in bad.output
    assert json.loads((tmp_path / "native" / "lowbit.json").read_text())["layers"]


def test_act_order_column_order_is_refused(model, tok, tmp_path):
    """GPTQ's act-order with a g_idx (--no-static-groups) cannot go to GGUF: the error says so and names the layer."""
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    q = lowbit.quantize(model, "Q4_0", method=lowbit.GPTQ(static_groups=False), calib=calib, progress=False)
    assert any(m.weight.g_idx is not None for m in quantized_modules(q).values())
    with pytest.raises(LowbitError, match=r"layer model\.layers\.0\.\S+ has act-order's column order \(g_idx\)"):
        save_gguf(q, tmp_path / "a.gguf", tokenizer=tok)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_quantizes_the_default_model_to_gguf_and_evaluates_the_file(tmp_path, monkeypatch):
    """What a user types: quantise to Q4_0 straight into a .gguf, then evaluate that file."""
    from click.testing import CliRunner

    from lowbit.cli import cli

    out = tmp_path / "m.gguf"
    runner = CliRunner()
    result = runner.invoke(cli, ["quantize", "default", "--scheme", "Q4_0", "--format", "gguf", "--out", str(out),
                                 "--no-eval", "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types == {"Q4_0", "Q8_0", "F32"}  # linears, the tied embedding, norms
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))  # the file's safetensors copy: not in the user's
    result = runner.invoke(cli, ["eval", str(out), "--max-windows", "1", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert 10 < json.loads((tmp_path / "e.json").read_text())["ppl"]["pydoc-eval"] < 40


def test_a_quantised_lm_head_is_written_as_output_weight(model, tok, tmp_path, monkeypatch):
    """--lm-head same with Q4_0: the untied head is the file's own output.weight, in Q4_0, and transformers'
    model computes our logits from it."""
    from lowbit.scheme import get_scheme, with_lm_head

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    q = lowbit.quantize(model, with_lm_head(get_scheme("Q4_0"), "same"), progress=False)
    path = save_gguf(q, tmp_path / "h.gguf", tokenizer=tok)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = tensors["output.weight"]
    assert out.tensor_type.name == "Q4_0"
    theirs = torch.from_numpy(dequantize(np.asarray(out.data), out.tensor_type))
    assert torch.equal(theirs, q.lm_head.weight.dequantize())
    emb = q.get_input_embeddings().weight
    emb.data = ggml_decode(ggml_encode(emb, "Q8_0"), "Q8_0")  # what the file holds for it
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(_transformers_model(path)(ids).logits, q(ids).logits, rtol=1e-4, atol=1e-4)


def test_header_strings_are_gguf_readers_own(tmp_path):
    """`header_string` walks the key/value header by the spec (scalars, strings, arrays of either): every string
    key of the default model's file and of a file gguf's writer made (arrays of every kind before the key) reads
    as gguf's reader has it; a missing key is None; a file it cannot follow raises ValueError."""
    from lowbit.io.gguf import header_string
    from lowbit.models.loading import resolve_source

    where = resolve_source(None)
    written = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(written), "llama")
    writer.add_array("a.ints", [1, 2, 3])
    writer.add_array("a.floats", [0.5, 1.5])
    writer.add_array("a.strings", ["x", "yz", ""])
    writer.add_array("a.nested", [[1, 2], [3]])
    writer.add_bool("a.bool", True)
    writer.add_uint64("a.u64", 7)
    writer.add_string("a.last", "é and more")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    for path in (where.directory / where.gguf_file, written):
        reader = gguf.GGUFReader(path)
        strings = [name for name, field in reader.fields.items() if field.types == [gguf.GGUFValueType.STRING]]
        assert strings
        for name in strings:
            assert header_string(path, name) == str(reader.get_field(name).contents()), name
        assert header_string(path, "no.such.key") is None
    assert header_string(written, "a.last") == "é and more"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(written.read_bytes()[:60])
    with pytest.raises(ValueError):
        header_string(cut, "a.last")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        header_string(tmp_path / "not.gguf", "a.last")


def test_a_header_the_walk_cannot_follow_is_read_by_ggufs_reader(tmp_path):
    """`metadata_string` (what the GGUF export asks for the source's tokenizer.ggml.pre) on a big-endian file, which
    `header_string` refuses: gguf's reader answers, the value and a missing key alike."""
    from lowbit.io.gguf import header_string, metadata_string

    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_array("a.ints", [1, 2, 3])
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        header_string(path, "tokenizer.ggml.pre")
    assert metadata_string(path, "tokenizer.ggml.pre") == "smollm"
    assert metadata_string(path, "no.such.key") is None
