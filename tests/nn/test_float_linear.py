"""lowbit's float GEMV (``lowbit::float_gemv_cpu``) and `FloatLinear`, the float layers a quantised model keeps."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.kernels import cpu, dispatch
from lowbit.nn import FloatLinear, QuantLinear, use_float_gemv
from lowbit.nn.float_linear import TOKENS

pytestmark = pytest.mark.skipif(cpu.extension() is not None, reason=f"no C++ kernels: {cpu.extension()}")
OP = torch.ops.lowbit.float_gemv_cpu.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_float32_sums(y, x, weight, bias=None):
    """y against float64 sums of the same inputs: float32 error on Σ|x·w| (K terms, summed in 16 lanes and then
    across them), plus one rounding to y's dtype. A wrong, missing or repeated product is far outside it."""
    x64, w64 = x.double(), weight.double()
    exact = x64 @ w64.T + (0 if bias is None else bias.double())
    magnitude = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
    K = x.shape[-1]
    bound = (K / 16 + 8) * 2.0**-24 * magnitude + torch.finfo(y.dtype).eps * exact.abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert torch.isfinite(y).all()
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"worst excess {(err / bound).max().item():.3g}× the float32 bound"


@settings(max_examples=150, deadline=None)
@given(M=st.integers(1, 9), N=st.integers(1, 41), K=st.integers(1, 700), w_dtype=st.sampled_from(DTYPES),
       x_dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), lead=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_float_gemv_on_random_shapes(M, N, K, w_dtype, x_dtype, with_bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=g).to(w_dtype)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    x = x[None] if lead else x  # leading dimensions are tokens too
    bias = torch.randn(N, generator=g).to(w_dtype) if with_bias else None
    check_float32_sums(OP(x, weight, bias), x, weight, bias)


def test_float_gemv_on_non_contiguous_inputs_and_empty_shapes():
    weight = torch.randn(40, 130)
    x = torch.randn(130, 3).T  # not contiguous
    check_float32_sums(OP(x, weight.T.contiguous().T), x, weight)
    assert OP(torch.randn(0, 130), weight).shape == (0, 40)
    assert OP(torch.randn(2, 130), weight[:0]).shape == (2, 0)
    bias = torch.randn(5)
    torch.testing.assert_close(OP(torch.randn(3, 0), torch.randn(5, 0), bias), bias.expand(3, 5), rtol=0, atol=0)


def test_float_gemv_checks_its_arguments():
    with pytest.raises(RuntimeError, match="K = x.size"):
        OP(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        OP(torch.randn(2, 8).double(), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="bias"):
        OP(torch.randn(2, 8), torch.randn(4, 8), torch.randn(3))


def test_float_gemv_passes_opcheck():
    torch.library.opcheck(OP, (torch.randn(2, 3, 100), torch.randn(24, 100)))
    torch.library.opcheck(OP, (torch.randn(1, 100, dtype=torch.bfloat16), torch.randn(24, 100, dtype=torch.bfloat16),
                               torch.randn(24, dtype=torch.bfloat16)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_linear_runs_the_gemv_for_a_few_tokens_and_f_linear_otherwise(dtype, monkeypatch):
    layer = nn.Linear(300, 70).to(dtype)
    plain = copy.deepcopy(layer)
    assert use_float_gemv(layer) == [""] and type(layer) is FloatLinear
    calls = []
    monkeypatch.setattr(cpu, "FLOAT_GEMV_OP", lambda *a: calls.append(a[0].shape) or OP(*a))
    first, last = TOKENS[dtype]
    with torch.inference_mode():
        for m in range(1, last + 3):
            x = torch.randn(m, 300).to(dtype)
            y = layer(x)
            if first <= m <= last:
                check_float32_sums(y, x, layer.weight, layer.bias)
            else:  # torch's own call, bit for bit
                assert torch.equal(y, plain(x))
        assert calls == [(m, 300) for m in range(first, last + 1)]
        x = torch.randn(2, 300).to(dtype)
        with dispatch.reference_only():  # plain torch throughout, as asked
            assert torch.equal(layer(x), plain(x))
        assert len(calls) == last - first + 1


def test_float_linear_trains_through_f_linear():
    layer = nn.Linear(64, 8)
    use_float_gemv(layer)
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()  # the op has no backward: a graph that needs one is F.linear's
    assert x.grad is not None and layer.weight.grad is not None
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # torch's own error for a wrong shape
        layer(torch.randn(1, 63))


def test_a_quantised_model_keeps_its_tied_head_and_decodes_as_plain_torch(default_model, eval_tokens, monkeypatch):
    q = lowbit.quantize(default_model, "W4A16", progress=False)
    assert type(q.lm_head) is FloatLinear  # the head stays float32, tied to the embedding
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert not any(type(m) is nn.Linear for m in q.modules())
    fp = copy.deepcopy(default_model)
    keys = list(fp.state_dict())
    assert len(use_float_gemv(fp)) == 7 * fp.config.num_hidden_layers + 1
    assert list(fp.state_dict()) == keys and fp.lm_head.weight is fp.model.embed_tokens.weight
    del fp
    calls = []
    monkeypatch.setattr(cpu, "FLOAT_GEMV_OP", lambda *a: calls.append(a[0].shape) or OP(*a))
    prompt = eval_tokens[:32][None]
    new = 12
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        fast = q.generate(prompt, **kwargs)
        assert len(calls) >= new - 1 and {shape[-1] for shape in calls} == {576}  # the head, once per new token
        with dispatch.reference_only():
            plain = q.generate(prompt, **kwargs)
        assert len(calls) <= new
    assert torch.equal(fast, plain)
    clone = pickle.loads(pickle.dumps(q))  # the class is importable: copies and pickles keep it
    assert type(clone.lm_head) is FloatLinear and clone.lm_head.weight is clone.model.embed_tokens.weight


def test_checkpoints_load_with_float_layers_on_the_gemv(default_model, tmp_path):
    model = copy.deepcopy(default_model)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    q = lowbit.quantize(model, "W8A16", progress=False)
    lowbit.save(q, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert type(loaded.lm_head) is FloatLinear
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 7
