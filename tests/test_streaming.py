"""Streaming quantisation (`lowbit.streaming`): one decoder layer in memory at a time, resumable.

A tiny random LLaMA checkpoint (3 layers, written as safetensors shards) stands in for a model
too large for memory; the default model checks the real thing with RTN.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lowbit import api, streaming
from lowbit.algorithms.gptq import GPTQ
from lowbit.errors import LowbitError
from lowbit.io.shards import load_tensors
from lowbit.streaming import quantize_streaming, work_directory


def _tiny_llama(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, max_shard_size="60KB")  # several shards, with an index
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(1))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_tensors(path).tensors)


def _same_checkpoint(a: Path, b: Path, outside_in_source_dtype: bool = False) -> None:
    """Equal tensors and layer records; with ``outside_in_source_dtype``, the tensors outside the decoder layers
    (which a streamed checkpoint keeps in the source's dtype, the in-memory one in float32) equal in value."""
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        x, y = ta[key], tb[key]
        if outside_in_source_dtype and not key.startswith("model.layers."):
            x, y = x.float(), y.float()
        assert x.dtype == y.dtype and torch.equal(x, y), key
    ma, mb = (json.loads((p / "lowbit.json").read_text()) for p in (a, b))
    assert ma["layers"] == mb["layers"] and ma["aliases"] == mb["aliases"]


def _in_memory(source: Path, out: Path, method, calib) -> Path:
    model = api.load_model(source)
    quantized = api.quantize(model, "W4A16", method, calib, progress=False)
    api.save(quantized, out)
    return out


@pytest.mark.parametrize("method", [None, GPTQ()], ids=["rtn", "gptq"])
def test_streamed_checkpoint_equals_the_in_memory_one(tiny, calib, tmp_path, method):
    streamed = quantize_streaming(tiny, tmp_path / "streamed", "W4A16", method, calib if method else None,
                                  progress=False)
    _same_checkpoint(streamed, _in_memory(tiny, tmp_path / "memory", method, calib if method else None))
    assert not work_directory(streamed).exists()  # the work directory goes once the checkpoint is written
    x = torch.randint(0, 96, (1, 12))
    assert torch.equal(api.load_model(streamed)(x).logits, api.load_model(tmp_path / "memory")(x).logits)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("where", ["after-layer", "mid-layer"])
def test_a_run_killed_after_some_layers_resumes_to_a_bit_identical_checkpoint(tiny, calib, tmp_path, monkeypatch,
                                                                             where):
    import lowbit.streaming as streaming

    reference = quantize_streaming(tiny, tmp_path / "whole", "W4A16", GPTQ(), calib, progress=False)
    out = tmp_path / "resumed"
    real_save = streaming._Run.save
    written = []

    def dying_save(self):  # the process dies once layer 1 is on disk (after its record, or just before it)
        if self.next_layer == 2 and where == "mid-layer":
            raise _Killed
        real_save(self)
        written.append(self.next_layer)
        if self.next_layer == 2:
            raise _Killed

    monkeypatch.setattr(streaming._Run, "save", dying_save)
    with pytest.raises(_Killed):
        quantize_streaming(tiny, out, "W4A16", GPTQ(), calib, progress=False)
    monkeypatch.setattr(streaming._Run, "save", real_save)
    assert not out.exists() and work_directory(out).is_dir()
    record = json.loads((work_directory(out) / "run.json").read_text())
    assert record["next_layer"] == (2 if where == "after-layer" else 1)

    loads = []
    real_load = streaming.load_layer
    monkeypatch.setattr(streaming, "load_layer", lambda layer, stored, prefix, dtype: loads.append(prefix) or
                        real_load(layer, stored, prefix, dtype))
    quantize_streaming(tiny, out, "W4A16", GPTQ(), calib, progress=False)
    first = record["next_layer"]
    assert loads == [f"model.layers.{i}." for i in range(first, 3)]  # only the layers not yet done
    _same_checkpoint(out, reference)


def test_a_work_directory_of_another_run_is_refused_not_mixed_in(tiny, calib, tmp_path, monkeypatch):
    import lowbit.streaming as streaming

    out = tmp_path / "out"
    monkeypatch.setattr(streaming._Run, "save", lambda self: (_ for _ in ()).throw(_Killed) if self.next_layer
                        else None)
    with pytest.raises(_Killed):
        quantize_streaming(tiny, out, "W4A16", GPTQ(), calib, progress=False)
    monkeypatch.undo()
    (work_directory(out) / "run.json").write_text(json.dumps({"fingerprint": {"other": 1}, "next_layer": 1}))
    with pytest.raises(LowbitError, match="unfinished run of another"):
        quantize_streaming(tiny, out, "W4A16", GPTQ(), calib, progress=False)
    with pytest.raises(LowbitError, match="calibration"):
        quantize_streaming(tiny, tmp_path / "other", "W4A16", GPTQ(), None, progress=False)


def test_a_checkpoint_missing_a_layer_tensor_is_named(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    shard = broken / index["weight_map"][key]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    del index["weight_map"][key]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LowbitError, match=key):
        quantize_streaming(broken, tmp_path / "out", "W4A16", progress=False)


def test_the_default_model_streams_to_the_in_memory_checkpoint(tmp_path):
    streamed = quantize_streaming(None, tmp_path / "streamed", "W4A16", progress=False)
    _same_checkpoint(streamed, _in_memory(None, tmp_path / "memory", None, None))


def test_the_cli_streams_resumes_and_names_what_it_cannot_do(tiny, tmp_path):
    from click.testing import CliRunner

    from lowbit.cli import cli

    runner = CliRunner()
    out = tmp_path / "cli"
    done = runner.invoke(cli, ["quantize", str(tiny), "--scheme", "W4A16", "--stream", "--out", str(out),
                               "--json", str(tmp_path / "r.json")])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["streamed"] and report["peak_rss_bytes"] > 0
    _same_checkpoint(out, quantize_streaming(tiny, tmp_path / "api", "W4A16", progress=False))
    refused = runner.invoke(cli, ["quantize", str(tiny), "--stream", "--format", "gptq", "--out", str(tmp_path / "g")])
    assert refused.exit_code != 0 and "native checkpoint" in refused.output


def test_a_bfloat16_checkpoint_streams_gptq_on_its_mapped_weights_to_the_in_memory_result(calib, tmp_path):
    """GPTQ calibrating in bfloat16 runs a bfloat16 checkpoint's layers on the mapped tensors (no float32 copy);
    the in-memory path loads float32 copies of the same values: the checkpoints are equal."""
    source = _tiny_llama(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    method = GPTQ(calib_dtype="bfloat16")  # not "auto": the path under test on any CPU, with or without bf16
    assert streaming._layer_dtype(method, load_tensors(source).tensors, "model.layers.") == torch.bfloat16
    streamed = quantize_streaming(source, tmp_path / "streamed", "W4A16", method, calib, progress=False)
    _same_checkpoint(streamed, _in_memory(source, tmp_path / "memory", method, calib), outside_in_source_dtype=True)
