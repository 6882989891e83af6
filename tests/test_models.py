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


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_the_memoised_reader_parses_as_ggufs_own(tmp_path, endian):
    """Within `gguf_parsed_once` the reader slices the header from a plain array over the mapped file, not the
    memmap: keys of every kind and the tensors' names, types, shapes and data read exactly as gguf's reader has
    them, in either byte order."""
    import gguf
    import numpy as np

    from lowbit.models.loading import gguf_parsed_once

    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=getattr(gguf.GGUFEndian, endian))
    writer.add_array("a.ints", [1, -2, 3])
    writer.add_array("a.floats", [0.5, 1.5])
    writer.add_array("a.strings", ["x", "yz", "", "é"])
    writer.add_array("a.nested", [[1, 2], [3]])
    writer.add_bool("a.bool", True)
    writer.add_uint64("a.u64", 2**40 + 7)
    writer.add_float32("a.f32", -0.25)
    writer.add_string("a.last", "é and more")
    rng = np.random.default_rng(0)
    tensors = {"t.f32": rng.standard_normal((3, 5)).astype(np.float32),
               "t.f16": rng.standard_normal((4, 8)).astype(np.float16), "t.i8": np.arange(-8, 8, dtype=np.int8)}
    for name, array in tensors.items():
        writer.add_tensor(name, array.copy())  # (the writer swaps a big-endian file's bytes itself)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    theirs = gguf.GGUFReader(path)
    with gguf_parsed_once():
        ours = gguf.GGUFReader(path)
        assert type(ours) is not type(theirs)  # the memoised subclass did the parsing
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 8
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.types, mine.data, mine.name) == (field.offset, field.types, field.data, name)
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert mine.contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == list(tensors)
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.tensor_type, list(mine.shape), mine.data_offset) == \
            (tensor.tensor_type, list(tensor.shape), tensor.data_offset)
        assert np.array_equal(mine.data, tensor.data) and mine.data.dtype == tensor.data.dtype
    for mine, (name, array) in zip(ours.tensors, tensors.items(), strict=True):
        assert np.array_equal(np.asarray(mine.data).astype(array.dtype).reshape(array.shape), array), name


def test_a_gguf_files_cache_is_keyed_by_its_content_not_its_path(tmp_path):
    """The safetensors copy of a GGUF file is found by the file's content (size and blocks spread over it): the
    same bytes at another path and time (another environment's install) share it; a byte changed in the header,
    in the middle or at the end makes another key."""
    import os
    import shutil

    from lowbit.models.loading import SAMPLE_BYTES, SAMPLES, ModelSource, _gguf_cache_dir, content_key

    data = bytearray(torch.randint(0, 256, (3 * 1024 * 1024 + 123,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "m.gguf").write_bytes(data)
    shutil.copy(tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf")  # a new path and modification time

    def key(path):
        stat = os.stat(path)
        return content_key(str(path), stat.st_size, stat.st_mtime_ns)

    assert key(tmp_path / "a" / "m.gguf") == key(tmp_path / "b" / "m.gguf")
    assert _gguf_cache_dir(ModelSource(tmp_path / "a", "m.gguf")) == \
        _gguf_cache_dir(ModelSource(tmp_path / "b", "m.gguf"))
    middle = (len(data) - SAMPLE_BYTES) * (SAMPLES // 2) // (SAMPLES - 1)  # where a block in the middle starts
    for at in (10, middle + 5, len(data) - 1):
        changed = bytearray(data)
        changed[at] ^= 1
        path = tmp_path / f"c{at}.gguf"
        path.write_bytes(changed)
        assert key(path) != key(tmp_path / "a" / "m.gguf"), at


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
