"""The command line as a user drives it: one-sentence errors and non-zero exits, and real runs."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lowbit.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["quantize", "/no/such/model", "--json", "x.json"], "model path '/no/such/model' does not exist"),
        (["quantize", "default", "--group-size", "0", "--json", "x.json"], "group size must be a positive integer, got 0"),
        (["quantize", "default", "--group-size", "-8", "--json", "x.json"], "group size must be a positive integer"),
        (["quantize", "default", "--scheme", "W5A16", "--json", "x.json"], "unknown scheme 'W5A16'"),
        (["quantize", "default", "--method", "magic", "--json", "x.json"], "unknown method 'magic'"),
        (["quantize", "default"], "nothing would be kept"),
        (["size", "/no/such/config.json"], "does not exist"),
        (["eval", "default", "--text", "/no/such.txt"], "text source '/no/such.txt' is not one of"),
        (["eval", "default", "--window", "1"], "evaluation needs window >= 2"),
        (["quantize", "default", "--method", "smoothquant", "--json", "x.json"], "leaves them in float (use AWQ)"),
        (["quantize", "default", "--scheme", "W8A8", "--method", "awq", "--json", "x.json"], "(use SmoothQuant)"),
        (["quantize", "default", "--method", "awq", "--alpha", "0.3", "--json", "x.json"],
         "--alpha does not apply to --method awq"),
        (["quantize", "default", "--method", "awq", "--act-order", "--json", "x.json"],
         "--act-order does not apply to --method awq"),
        (["quantize", "default", "--scheme", "W8A8", "--method", "smoothquant", "--alpha", "2", "--json", "x.json"],
         "SmoothQuant alpha must lie in [0, 1], got 2.0"),
        (["quantize", "default", "--scheme", "FP8", "--method", "smoothquant+gptq", "--json", "x.json"],
         "SmoothQuant+GPTQ quantises integer weights"),
        (["quantize", "default", "--scheme", "W8A8_STATIC", "--json", "x.json"], "calibrated by SmoothQuant"),
        (["quantize", "default", "--method", "awq+gptq", "--propagate", "float", "--json", "x.json"],
         "--propagate does not apply to --method awq+gptq"),
        (["quantize", "default", "--method", "gptq", "--propagate", "quantized", "--json", "x.json"],
         "--propagate does not apply to --method gptq"),
        (["quantize", "default", "--lm-head", "int8", "--stream", "--out", "q"],
         "streaming quantises decoder layers only; scheme W4A16+lm_head-int8 also quantises lm_head"),
        (["quantize", "default", "--lm-head", "same", "--target-bpw", "4", "--json", "x.json"],
         "--lm-head same is not combined with a bit plan yet"),
    ],
)
def test_bad_input_is_one_sentence_and_nonzero(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = run(*args)
    assert code != 0
    assert message in _one_error_line(output)


def test_empty_text_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, output = run("eval", "default", "--text", str(empty))
    assert code == 1
    assert f"text file '{empty}' is empty" in _one_error_line(output)


def test_corrupt_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    code, output = run("eval", str(tmp_path))
    assert code == 1
    assert f"could not load model '{tmp_path}'" in _one_error_line(output)


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, output = run("eval", str(bad))
    assert code == 1
    assert "broken.gguf" in _one_error_line(output)


def test_directory_that_is_not_a_model(tmp_path):
    code, output = run("eval", str(tmp_path))
    assert code == 1
    assert "is neither a Hugging Face model directory" in _one_error_line(output)


def test_size_of_llama2_70b_config(tmp_path):
    config = {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, output = run("size", str(path), "--scheme", "W4A16", "--json", str(tmp_path / "size.json"))
    assert code == 0, output
    report = json.loads((tmp_path / "size.json").read_text())
    assert 137e9 < report["bf16_bytes"] < 139e9  # 68.98 B parameters × 2 bytes
    # int4 + one fp16 scale per 128 weights = 4.125 bits on the linears; embeddings stay bf16
    assert report["bits_per_weight"] == pytest.approx(4.125)
    assert 35e9 < report["weight_bytes"] < 37e9
    assert "H100" in output and "fits" in output


def test_size_reads_the_default_model_config():
    code, output = run("size", "default", "--scheme", "NF4")
    assert code == 0, output
    assert "0.135 B parameters" in output


def test_a_gguf_models_config_is_read_from_its_converted_copy_where_there_is_one(tmp_path, monkeypatch):
    """Reading the default model's config from its GGUF file parses all of its metadata (5 s); once a load has
    written the safetensors copy, its config.json is read instead, with the same architecture."""
    from lowbit import load_model
    from lowbit.footprint import read_config
    from lowbit.models.loading import cached_gguf_config, resolve_source

    load_model()  # the copy in this session's cache exists
    assert cached_gguf_config(resolve_source(None)) is not None
    cached = read_config("default")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # no copy here
    assert cached_gguf_config(resolve_source(None)) is None
    from_gguf = read_config("default")
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings", "model_type")
    assert {k: cached[k] for k in keys} == {k: from_gguf[k] for k in keys}


def test_console_script_runs_help():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "quantize", "eval", "size", "generate"):
        assert command in out.stdout


def test_include_and_exclude_patterns(tmp_path):
    report = tmp_path / "r.json"
    code, output = run("quantize", "default", "--include", r".*\.mlp\..*", "--exclude", r".*down_proj",
                       "--no-eval", "--json", str(report))
    assert code == 0, output
    data = json.loads(report.read_text())
    assert data["quantized_params"] == 30 * 2 * 576 * 1536  # gate and up of every layer, nothing else
    assert data["scheme"]["targets"] == [r".*\.mlp\..*"]
    code, output = run("quantize", "default", "--include", "(", "--no-eval", "--json", str(report))
    assert code == 1 and "is not a valid regular expression" in _one_error_line(output)
    code, output = run("quantize", "default", "--include", "nothing.matches", "--no-eval", "--json", str(report))
    assert code == 1 and "selects no linear layer" in _one_error_line(output)


def test_quantize_to_compressed_tensors_then_export_to_gptq_and_evaluate(tmp_path):
    """The checkpoint-format round trip a user makes: the codes survive both writes, evaluation reads either."""
    import json

    import torch

    import lowbit
    from lowbit.nn import quantized_modules

    ct, gptq = tmp_path / "ct", tmp_path / "gptq"
    code, output = run("quantize", "default", "--scheme", "W4A16", "--group-size", "64", "--format",
                       "compressed-tensors", "--out", str(ct), "--no-eval", "--json", str(tmp_path / "q.json"))
    assert code == 0, output
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    code, output = run("export", str(ct), "--format", "gptq", "--out", str(gptq))
    assert code == 0, output
    a, b = quantized_modules(lowbit.load(ct)), quantized_modules(lowbit.load(gptq))
    assert len(a) == 210 and a.keys() == b.keys()
    assert all(torch.equal(a[k].weight.dequantize(), b[k].weight.dequantize()) for k in a)
    code, output = run("eval", str(gptq), "--max-windows", "1", "--json", str(tmp_path / "e.json"))
    assert code == 0, output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["format"] == "gptq" and 10 < report["ppl"]["pydoc-eval"] < 40
    code, output = run("export", str(ct), "--format", "gptq", "--out", str(gptq))
    assert code != 0 and "already exists" in _one_error_line(output)


def test_smoothquant_from_the_command_line_then_eval(tmp_path):
    """A user's run: SmoothQuant W8A8 on the default model, saved, evaluated again by 'lowbit eval' (in this
    process: the console script's own start is test_console_script_runs_help's and the demo's)."""
    out, report = tmp_path / "sq", tmp_path / "e.json"
    result = CliRunner().invoke(cli, ["quantize", "default", "--scheme", "W8A8", "--method", "smoothquant", "--alpha",
                                      "0.6", "--calib-samples", "2", "--calib-seqlen", "128", "--out", str(out),
                                      "--no-eval"])
    assert result.exit_code == 0, result.output
    assert "scales folded into 90 groups of linears; 30 left unscaled" in result.stderr
    assert "grouped-query attention" in result.stderr
    code, output = run("eval", str(out), "--reference", "default", "--window", "256", "--max-windows", "1",
                       "--kl-windows", "1", "--json", str(report))
    assert code == 0, output
    data = json.loads(report.read_text())
    assert data["method"]["name"] == "smoothquant" and data["method"]["alpha"] == 0.6
    assert data["scheme"]["name"] == "W8A8" and 0 < data["kl"] < 0.1


def test_size_counts_a_quantised_lm_head_on_top_of_the_tied_embedding(tmp_path):
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "vocab_size": 32000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    sizes = {}
    for head in ("float", "int8"):
        code, output = run("size", str(tmp_path / "config.json"), "--scheme", "W4A16", "--lm-head", head,
                           "--json", str(tmp_path / f"{head}.json"))
        assert code == 0, output
        sizes[head] = json.loads((tmp_path / f"{head}.json").read_text())["weight_bytes"]
    # untied: 32000 × 4096 int8 codes plus one float16 scale per row, the float embedding kept
    assert sizes["int8"] - sizes["float"] == 32000 * 4096 + 32000 * 2


def test_quantize_with_an_int8_lm_head(tmp_path):
    out, report = tmp_path / "q", tmp_path / "r.json"
    code, output = run("quantize", "default", "--lm-head", "int8", "--out", str(out), "--no-eval",
                       "--json", str(report))
    assert code == 0, output
    data = json.loads(report.read_text())
    assert data["quantized_params"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536) + 49152 * 576
    saved = json.loads((out / "lowbit.json").read_text())
    assert saved["scheme"]["lm_head"]["bits"] == 8 and saved["scheme"]["lm_head"]["granularity"] == "channel"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
