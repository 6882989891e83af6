"""Faults a checkpoint reader meets: a save killed mid-write, and random corruption of every file (of a
one-file checkpoint, and of a sharded one: its index and its shards). The previous checkpoint must
survive the first; the second must end in a LowbitError (or a valid load), never another exception,
a crash or a hang."""

import random
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.nn import quantized_modules
from lowbit.scheme import QuantSpec, Scheme

W4 = Scheme(QuantSpec("int", 4, "group", 32), name="W4A16 g32")
KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    import safetensors.torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import lowbit
    from lowbit.scheme import QuantSpec, Scheme

    real = safetensors.torch.save_file
    def save_then_die(*args, **kwargs):  # the weights (or a first shard) are in the temporary directory: die now
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = save_then_die
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    q = lowbit.quantize(LlamaForCausalLM(config), Scheme(QuantSpec("int", 4, "group", 32), name="x"), progress=False)
    lowbit.save(q, sys.argv[1], format=sys.argv[2], overwrite=True, max_shard_size=int(sys.argv[3]))
""")


@pytest.mark.parametrize("fmt, max_shard_size", [("native", 5 * 10**9), ("compressed-tensors", 5 * 10**9),
                                                 ("gptq", 5 * 10**9), ("native", 20_000)])
def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_intact(tiny, tmp_path, fmt, max_shard_size):
    out = tmp_path / "ckpt"
    q = lowbit.quantize(tiny, W4, progress=False)
    lowbit.save(q, out, format=fmt, max_shard_size=max_shard_size)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = subprocess.run([sys.executable, "-c", KILLER, str(out), fmt, str(max_shard_size)], capture_output=True,
                          text=True)
    assert done.returncode == -9, done.stderr[-2000:]  # it did die, by SIGKILL, mid-save
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    layers = quantized_modules(lowbit.load(out))
    assert all(torch.equal(m.weight.qdata, quantized_modules(q)[k].weight.qdata) for k, m in layers.items())


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "splice", "zero"])
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "splice":
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    else:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 256)] = bytes(min(256, len(b) - i))
    return bytes(b)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("fmt", ["native", "compressed-tensors", "gptq"])
def test_random_corruption_ends_in_one_clear_error_or_a_valid_load(tiny, tmp_path, fmt, sharded):
    out = tmp_path / "ckpt"
    # sharded: about 20 kB per shard, so a handful of shards and a model.safetensors.index.json
    lowbit.save(lowbit.quantize(tiny, W4, progress=False), out, format=fmt, max_shard_size=20_000 if sharded else "5GB")
    files = sorted(p for p in out.iterdir() if p.suffix in (".json", ".safetensors"))
    index = out / "model.safetensors.index.json"
    assert index.is_file() == sharded and len(files) > (5 if sharded else 1)
    pristine = {p: p.read_bytes() for p in files}
    rng = random.Random(f"fuzz-{fmt}{'-sharded' if sharded else ''}")
    outcomes = {"error": 0, "loaded": 0}
    for i in range(150):
        victim = index if sharded and i % 3 == 0 else rng.choice(files)  # the index gets a third of the mutations
        victim.write_bytes(_mutate(pristine[victim], rng))
        try:
            lowbit.load(out)
            outcomes["loaded"] += 1
        except LowbitError as err:
            assert str(err) and "\n" not in str(err).strip()
            outcomes["error"] += 1
        finally:
            victim.write_bytes(pristine[victim])
    assert outcomes["error"] > 0, outcomes  # the mutations did reach the parser
