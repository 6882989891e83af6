"""The quantised KV cache (lowbit.kv_cache): rotations leave the function unchanged, quantisation
acts per token exactly as a stored cache would, rotations lower the damage, bad settings refused."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kv_cache import KVQuant, quantize_kv_cache


@pytest.fixture(scope="module")
def model(first_layers):
    return first_layers(3).eval()


@pytest.fixture(scope="module")
def ids(eval_tokens):
    return eval_tokens[: 2 * 160].reshape(2, 160)


def _logits(model, ids, config):
    quantize_kv_cache(model, config)
    try:
        with torch.inference_mode():
            return model(ids).logits.float()
    finally:
        quantize_kv_cache(model, KVQuant(None, rotate=False))


def _kl(logits, ref):
    return F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()


def test_rotations_alone_leave_the_float_function_unchanged(model, ids):
    ref = _logits(model, ids, KVQuant(None, rotate=False))
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(_logits(model, ids, KVQuant(None, rotate=True)), ref, atol=2e-4, rtol=1e-4)


def test_rotations_lower_the_damage_of_a_quantised_cache(model, ids):
    ref = _logits(model, ids, KVQuant(None, rotate=False))
    kl = {(bits, rotate): _kl(_logits(model, ids, KVQuant(bits, rotate=rotate)), ref)
          for bits in (4, 8) for rotate in (False, True)}
    assert 0 < kl[8, True] < kl[8, False] < kl[4, True] < kl[4, False]
    assert kl[8, True] < 1e-3  # an 8-bit cache is close to lossless
    assert _kl(_logits(model, ids, KVQuant(4, group_size=32)), ref) < kl[4, True]  # smaller groups help more


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_decoding_token_by_token_reads_what_a_stored_cache_would_hold(first_layers, ids, implementation):
    """Each (token, head) vector is quantised on its own, so re-reading the cache at every step changes
    nothing: incremental decoding with a KV cache gives the logits of one full forward."""
    model = first_layers(2).eval()
    model.set_attn_implementation(implementation)
    quantize_kv_cache(model, KVQuant(4, rotate=True))
    assert model.config._attn_implementation == f"lowbit_kv_{implementation}"
    seq = ids[:1, :24]
    with torch.inference_mode():
        full = model(seq).logits
        out = model(seq[:, :16], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(16, 24):
            out = model(seq[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_bad_settings_are_refused(model):
    with pytest.raises(LowbitError, match="between 2 and 8"):
        KVQuant(9)
    with pytest.raises(LowbitError, match="group size"):
        KVQuant(4, group_size=0)
    with pytest.raises(LowbitError, match="does not divide the head dimension 64"):
        quantize_kv_cache(model, KVQuant(4, group_size=48))
    assert model.config._attn_implementation == "sdpa"  # nothing was changed


def test_cli_eval_with_a_quantised_kv_cache(tmp_path):
    import json

    from click.testing import CliRunner

    from lowbit.cli import cli

    runner = CliRunner()
    bad = runner.invoke(cli, ["eval", "default", "--kv-bits", "12"])
    assert bad.exit_code == 1 and "between 2 and 8" in bad.output
    lonely = runner.invoke(cli, ["eval", "default", "--kv-group-size", "32"])
    assert lonely.exit_code == 1 and "--kv-bits" in lonely.output
    result = runner.invoke(cli, ["eval", "default", "--kv-bits", "4", "--kv-group-size", "32", "--reference", "default",
                                 "--window", "256", "--max-windows", "1", "--kl-windows", "1",
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kv_cache"] == "KV int4 g32 + Hadamard" and report["kl"] > 0
