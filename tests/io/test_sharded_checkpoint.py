"""Sharded checkpoints (model-0000i-of-0000N.safetensors + model.safetensors.index.json): the default model
written in shards by each of the three writers holds exactly the tensors of the one-file save and loads to
the same codes and logits; transformers reads the sharded compressed-tensors export through the index
itself; each way the index and the shards can disagree is one LowbitError naming the file and tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.shards import INDEX, WEIGHTS, parse_size
from lowbit.nn import quantized_modules
from lowbit.scheme import QuantSpec, Scheme

FORMATS = ["native", "compressed-tensors", "gptq"]
W4 = Scheme(QuantSpec("int", 4, "group", 64), name="W4A16 g64")  # float16 scales: every format holds it
LAYER_KEYS = {"native": ("qdata", "scale", "zero_point", "g_idx", "bias"),
              "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "bias"),
              "gptq": ("qweight", "qzeros", "scales", "g_idx", "bias")}


@pytest.fixture(scope="module")
def quantized_default(default_model):
    return lowbit.quantize(default_model, W4, progress=False)


@pytest.fixture(scope="module")
def tiny_q(tiny):
    return lowbit.quantize(tiny, Scheme(QuantSpec("int", 4, "group", 32), name="W4A16"), progress=False)


def _assert_same_codes(a, b) -> None:
    before, after = quantized_modules(a), quantized_modules(b)
    assert before.keys() == after.keys() and before
    for layer, mod in before.items():
        theirs = after[layer].weight.tensors()
        for buf, tensor in mod.weight.tensors().items():
            assert tensor.dtype == theirs[buf].dtype and torch.equal(tensor, theirs[buf]), (layer, buf)


def _check_layout(q, out, fmt, limit: int) -> dict[str, torch.Tensor]:
    """Shards named and numbered as transformers names them, an index listing every tensor once in the shard
    that holds it with the right total_size, no shard over the limit but for a lone big tensor, and each
    quantised layer in one shard; returns all the tensors."""
    assert not (out / WEIGHTS).exists()
    index = json.loads((out / INDEX).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                           for i in range(1, len(shards) + 1)]
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        held = load_file(str(out / name))
        assert held.keys() == {k for k, f in index["weight_map"].items() if f == name}
        assert not held.keys() & tensors.keys()
        tensors.update(held)
        size = sum(t.numel() * t.element_size() for t in held.values())
        assert size <= limit or len(held) == 1, (name, size)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for layer in quantized_modules(q):
        files = {index["weight_map"][f"{layer}.{key}"] for key in LAYER_KEYS[fmt]
                 if f"{layer}.{key}" in index["weight_map"]}
        assert len(files) == 1, (layer, files)
    return tensors


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_default_model_in_shards(quantized_default, tmp_path, fmt):
    """At "20MB" the default model (about 160 MB at W4A16 g64, its 113 MB float embedding shared with the
    output) is written in shards; their tensors are the one-file save's, bit for bit, and load to the same
    codes. GPTQ's repacking makes each of its saves and loads take seconds here: its one-file comparison
    and round trip are on the tiny model below, the shared code path being the same."""
    q = quantized_default
    sharded = lowbit.save(q, tmp_path / "sharded", format=fmt, max_shard_size="20MB")
    tensors = _check_layout(q, sharded, fmt, 20 * 10**6)
    if fmt == "gptq":
        assert all(f"{layer}.{key}" in tensors for layer in quantized_modules(q)
                   for key in ("qweight", "qzeros", "scales", "g_idx"))
        return
    one = lowbit.save(q, tmp_path / "one", format=fmt)
    assert (one / WEIGHTS).is_file() and not (one / INDEX).exists()
    _assert_same_tensors(tensors, load_file(str(one / WEIGHTS)))
    _assert_same_codes(q, lowbit.load(sharded))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sharded_round_trip_gives_the_one_file_codes_and_logits(tiny_q, tmp_path, fmt):
    one = lowbit.save(tiny_q, tmp_path / "one", format=fmt)
    sharded = lowbit.save(tiny_q, tmp_path / "sharded", format=fmt, max_shard_size=20_000)
    _assert_same_tensors(_check_layout(tiny_q, sharded, fmt, 20_000), load_file(str(one / WEIGHTS)))
    a, b = lowbit.load(one), lowbit.load(sharded)
    _assert_same_codes(a, b)
    _assert_same_codes(tiny_q, b)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert torch.equal(tiny_q(ids).logits, b(ids).logits)


def test_transformers_reads_the_sharded_compressed_tensors_export(tiny_q, tmp_path):
    from transformers import AutoModelForCausalLM

    q = tiny_q
    out = lowbit.save(q, tmp_path / "ct", format="compressed-tensors", max_shard_size=20_000)
    assert (out / INDEX).is_file() and len(list(out.glob("model-*.safetensors"))) >= 3
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # it follows the index itself
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, q(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, expected", [(1234, 1234), ("2GB", 2 * 10**9), ("500MB", 500 * 10**6),
                                            ("1GiB", 2**30), ("1.5 gb", 15 * 10**8), ("64kib", 65536)])
def test_sizes_read_like_transformers(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "", "GB", "-1", 0, -5, "0MB", True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bad_size_is_refused_before_anything_is_written(tiny_q, tmp_path, size, fmt):
    with pytest.raises(LowbitError, match="max shard size"):
        lowbit.save(tiny_q, tmp_path / "x", format=fmt, max_shard_size=size)
    assert not (tmp_path / "x").exists()


def _sharded(q, tmp_path, fmt):
    out = lowbit.save(q, tmp_path / fmt, format=fmt, max_shard_size=20_000)
    index = json.loads((out / INDEX).read_text())
    return out, index, sorted(out.glob("model-*.safetensors"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_shard_is_named(tiny_q, tmp_path, fmt):
    out, index, shards = _sharded(tiny_q, tmp_path, fmt)
    shards[1].unlink()
    with pytest.raises(LowbitError, match=rf"shard '.*{shards[1].name}' listed in '.*{INDEX}' .* is missing"):
        lowbit.load(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_the_index_places_in_a_shard_that_lacks_it_is_named(tiny_q, tmp_path, fmt):
    out, index, shards = _sharded(tiny_q, tmp_path, fmt)
    held = load_file(str(shards[-1]))
    gone = sorted(held)[0]
    save_file({k: t for k, t in held.items() if k != gone}, str(shards[-1]))
    with pytest.raises(LowbitError, match=rf"tensor {gone}, which .* places in '.*{shards[-1].name}', is missing"):
        lowbit.load(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_the_index_does_not_list_is_an_error(tiny_q, tmp_path, fmt):
    """Not ignored: the shards and the index disagree, and neither can be trusted over the other."""
    out, index, shards = _sharded(tiny_q, tmp_path, fmt)
    held = load_file(str(shards[0]))
    save_file({**held, "model.stray.weight": torch.zeros(3)}, str(shards[0]))
    with pytest.raises(LowbitError, match=rf"'.*{shards[0].name}' holds tensor model\.stray\.weight, which "
                                          rf"'.*{INDEX}' does not list"):
        lowbit.load(out)
    save_file(held, str(shards[0]))  # the index moving a tensor to another shard is caught the same way
    moved = sorted(held)[0]
    index["weight_map"][moved] = shards[1].name
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(LowbitError, match=rf"{moved}"):
        lowbit.load(out)


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "does not hold a JSON object"),
    ('{"metadata": {}}', "has no weight_map object"),
    ('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}', "not a .safetensors file name beside"),
    ('{"weight_map": {"model.norm.weight": 7}}', "not a .safetensors file name beside"),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_index_that_is_not_an_index_is_named(tiny_q, tmp_path, fmt, text, match):
    out, index, shards = _sharded(tiny_q, tmp_path, fmt)
    (out / INDEX).write_text(text)
    with pytest.raises(LowbitError, match=rf"'.*{INDEX}'.*{match}"):
        lowbit.load(out)


def test_max_shard_size_through_the_cli(tiny, default_tokenizer, tmp_path):
    from click.testing import CliRunner

    from lowbit.cli import cli

    source = tmp_path / "tiny-hf"
    tiny.save_pretrained(source)
    default_tokenizer.save_pretrained(source)  # quantize reads MODEL's tokenizer (RTN, --no-eval: never used)
    run = CliRunner().invoke
    done = run(cli, ["quantize", str(source), "--scheme", "W4A16", "--group-size", "32", "--out",
                     str(tmp_path / "q"), "--max-shard-size", "30KB", "--no-eval"])
    assert done.exit_code == 0, done.output
    assert len(json.loads((tmp_path / "q" / INDEX).read_text())["weight_map"]) > 0
    done = run(cli, ["export", str(tmp_path / "q"), "--format", "gptq", "--out", str(tmp_path / "g"),
                     "--max-shard-size", "20000"])
    assert done.exit_code == 0, done.output
    assert len(list((tmp_path / "g").glob("model-*-of-*.safetensors"))) >= 3
    _assert_same_codes(lowbit.load(tmp_path / "q"), lowbit.load(tmp_path / "g"))
    done = run(cli, ["export", str(tmp_path / "q"), "--format", "native", "--out", str(tmp_path / "n")])
    assert done.exit_code == 0 and (tmp_path / "n" / WEIGHTS).is_file()  # 5 GB by default: one file
    done = run(cli, ["export", str(tmp_path / "q"), "--format", "native", "--out", str(tmp_path / "x"),
                     "--max-shard-size", "5XB"])
    assert done.exit_code == 1 and "error: max shard size '5XB' is not a size" in done.output
    assert not (tmp_path / "x").exists()
