"""Model loading: the safetensors cache of a GGUF file is the same model, errors name the path."""

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models import decoder_layers, default_model_path, resolve_source, select_linears
from lowbit.models.loading import _load_hf, _load_hf_tokenizer


def test_cache_is_identical_to_the_gguf(default_model, default_tokenizer, monkeypatch):
    """The cached copy (what every later load reads) gives the same weights and tokens as GGUF, read here as the
    conversion reads it: transformers parses the file once for the model and the tokenizer together, and the
    gguf module is as it was afterwards."""
    import gguf

    from lowbit.models.loading import gguf_parsed_once

    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    path = default_model_path()
    with gguf_parsed_once():
        direct = _load_hf(path.parent, path.name, torch.float32)
        tokenizer = _load_hf_tokenizer(path.parent, path.name)
    assert parsed == [path.name]
    assert gguf.GGUFReader is CountingReader
    for (name, a), (_, b) in zip(sorted(direct.state_dict().items()), sorted(default_model.state_dict().items())):
        assert torch.equal(a, b), name
    from lowbit.calibration import load_text

    text = load_text("pydoc-eval")[:20000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
        default_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_default_names():
    for name in (None, "", "default"):
        assert resolve_source(name).gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_resolve_errors(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(LowbitError, match="holds several GGUF files"):
        resolve_source(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LowbitError, match="is not a .gguf file"):
        resolve_source(tmp_path / "weights.bin")


def test_generic_discovery(default_model):
    name, layers = decoder_layers(default_model)
    assert name == "model.layers" and len(layers) == 30
    linears = select_linears(default_model, [r".*mlp\..*"], [r".*down_proj"])
    assert len(linears) == 60 and all("down_proj" not in n for n in linears)
    with pytest.raises(LowbitError, match="target pattern '\\(' is not a valid regular expression"):
        select_linears(default_model, ["("], [])
