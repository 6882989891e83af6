"""GPTQ's solver against a direct float64 implementation of the same equations, and against RTN."""

import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize, output_error
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec
from lowbit.tensor import int_qparams, quantize_weight


def correlated_inputs(n, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(n, cols, generator=gen) @ mix + 0.05 * torch.randn(n, cols, generator=gen)
    x[:, :: max(1, cols // 7)] *= 6  # a few loud channels, as real activations have
    return x


def hessian_of(x):
    acc = HessianAccumulator.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(97):
        acc.add(chunk)
    return acc.hessian()


def direct_gptq(W, H, spec, damp):
    """Textbook OBS/GPTQ in float64: no blocks, explicit inverse, per-channel parameters."""
    W = W.double().clone()
    Hd = H.double() + damp * H.diagonal().double().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    scale, zero = int_qparams(W.float(), spec, W.shape[1])
    s = scale.double()[:, 0]
    z = torch.zeros_like(s) if zero is None else zero.double()[:, 0]
    qmin, qmax = (-(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1) if spec.symmetric else (0, (1 << spec.bits) - 1)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = ((torch.round(W[:, i] / s) + z).clamp(qmin, qmax) - z) * s
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i + 1 :] -= err[:, None] * Hinv[i, i + 1 :][None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]  # condition on column i
    return Q


@pytest.mark.parametrize("spec", [QuantSpec("int", 4, "channel", scale_dtype="float32"),
                                  QuantSpec("int", 3, "channel", symmetric=False, scale_dtype="float32")])
def test_solver_matches_direct_float64_implementation(spec):
    x = correlated_inputs(2048, 96)
    H = hessian_of(x)
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(3)) * 0.1
    result = gptq_quantize(W, H, spec, block_size=32, damp=0.01)
    Q_direct = direct_gptq(W, H, spec, 0.01)
    Q = result.weight.dequantize().double()
    agree = (Q - Q_direct).abs() < 1e-5
    assert agree.float().mean() > 0.995  # float32 vs float64 may flip a rare rounding tie
    assert result.error == pytest.approx(output_error(W, Q_direct.float(), H), rel=0.02)


def test_reported_error_is_the_output_error_computed_directly():
    x = correlated_inputs(4096, 128, seed=1)
    H = hessian_of(x)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    result = gptq_quantize(W, H, QuantSpec("int", 4, "group", 32), damp=0.0)
    Q = result.weight.dequantize()
    direct = ((W.double() - Q.double()) @ x.double().T).pow(2).sum().item() / x.shape[0]
    assert result.error == pytest.approx(direct, rel=1e-6)
    # with no damping the solver's own running loss is the same quantity
    assert result.loss == pytest.approx(direct, rel=1e-3)


SPECS = [
    QuantSpec("int", 4, "group", 128),
    QuantSpec("int", 4, "group", 64, symmetric=False),
    QuantSpec("int", 3, "group", 128, symmetric=False),
    QuantSpec("int", 2, "group", 64, symmetric=False),
    QuantSpec("int", 8, "channel"),
    QuantSpec("int", 4, "group", 100, observer="mse"),
    QuantSpec("int", 4, "tensor", scale_dtype="float32"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.describe()}-{s.observer}")
@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_output_error_is_at_most_rtn(spec, act_order, static_groups):
    x = correlated_inputs(3000, 576, seed=2)  # 576 = 4·128 + 64: ragged groups
    H = hessian_of(x)
    W = torch.randn(48, 576, generator=torch.Generator().manual_seed(7)) * 0.02
    result = gptq_quantize(W, H, spec, act_order=act_order, static_groups=static_groups)
    rtn = output_error(W, quantize_weight(W, spec).dequantize(), H)
    assert result.error == pytest.approx(output_error(W, result.weight.dequantize(), H), rel=1e-5)
    assert result.error <= rtn
    has_g_idx = result.weight.g_idx is not None
    assert has_g_idx == (act_order and not static_groups and spec.granularity == "group")


def test_dead_input_channel_gives_no_nan():
    x = correlated_inputs(1000, 64)
    x[:, 5] = 0.0  # this input never carries signal: H[5, 5] = 0, H is singular
    H = hessian_of(x)
    W = torch.randn(16, 64) * 0.1
    result = gptq_quantize(W, H, QuantSpec("int", 4, "group", 32), act_order=True)
    assert result.dead_columns == 1
    deq = result.weight.dequantize()
    assert torch.isfinite(deq).all() and (deq[:, 5] == 0).all()


def test_refusals():
    H = torch.eye(8)
    with pytest.raises(LowbitError, match="GPTQ quantises integer formats"):
        gptq_quantize(torch.ones(2, 8), H, QuantSpec("nf4", 4, "group", 8))
    bad = torch.eye(8)
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="Hessian of w contains NaN"):
        gptq_quantize(torch.ones(2, 8), bad, QuantSpec("int", 4, "channel"), name="w")


def test_hessian_statistics_add_exactly_across_batches():
    x = correlated_inputs(1000, 40)
    whole = HessianAccumulator.zeros(40, dtype=torch.float64)
    whole.add(x)
    parts = [HessianAccumulator.zeros(40, dtype=torch.float64) for _ in range(3)]
    for part, chunk in zip(parts, x.split(400)):
        part.add(chunk[None])  # leading dims are rows too
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    assert parts[0].count == 1000
    assert torch.allclose(parts[0].hessian(), whole.hessian(), atol=1e-6)
    assert torch.allclose(whole.hessian(), (2 * x.double().T @ x.double() / 1000).float(), atol=1e-5)


@pytest.mark.parametrize("block,rows,cols", [(16, 37, 50), (16, 1000, 16), (7, 5, 64), (256, 8192, 300)])
def test_block_triangular_accumulation_equals_the_full_product(monkeypatch, block, rows, cols):
    import lowbit.algorithms.hessian as hessian

    monkeypatch.setattr(hessian, "BLOCK", block)
    monkeypatch.setattr(hessian, "ROWS", rows)
    x = correlated_inputs(523, cols, seed=7)
    acc = HessianAccumulator.zeros(cols, dtype=torch.float64)
    acc.add(x[:300].bfloat16())  # a bfloat16 input is widened slice by slice
    acc.add(x[300:].bfloat16())
    xb = x.bfloat16().double()
    expected = (2 * xb.T @ xb / 523).float()
    H = acc.hessian()
    assert torch.equal(H, H.T)
    assert torch.allclose(H, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_one_solve_for_weights_sharing_an_input_equals_separate_solves(act_order, static):
    from lowbit.algorithms.gptq import gptq_quantize_group

    x = correlated_inputs(1024, 72, seed=4)
    H = hessian_of(x)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(r, 72, generator=gen) * 0.05 for r in (24, 8, 8)]
    spec = QuantSpec("int", 4, "group", 32, symmetric=False)
    together = gptq_quantize_group(weights, H, spec, block_size=32, act_order=act_order, static_groups=static,
                                   names=["q", "k", "v"])
    for W, joint in zip(weights, together):
        alone = gptq_quantize(W, H, spec, block_size=32, act_order=act_order, static_groups=static)
        assert (joint.weight.codes() == alone.weight.codes()).float().mean() > 0.999
        assert torch.allclose(joint.weight.dequantize(), alone.weight.dequantize(), atol=1e-6)
        assert joint.error == pytest.approx(alone.error, rel=1e-4)
        assert (joint.weight.g_idx is None) == (alone.weight.g_idx is None)


def test_factor_in_blocks_matches_the_inverse_cholesky_in_one_piece(monkeypatch):
    """The in-place blocked Cholesky, triangular inverse and float32 narrowing (blocks of 32 over 150
    columns: a ragged last block) give U with (P·H·Pᵀ + λI)⁻¹ = UᵀU, as the one-piece float64 route does."""
    import lowbit.algorithms.gptq as gptq

    monkeypatch.setattr(gptq, "FACTOR_BLOCK", 32)
    x = correlated_inputs(400, 150, seed=4)
    x[:, 7] = 0.0  # a dead input
    H = hessian_of(x)
    factor = gptq.gptq_factor(H, damp=0.01, act_order=True)
    U = torch.cat([factor.rows(i, min(i + 40, 150)) for i in range(0, 150, 40)]).double()
    P = factor.perm
    Hd = H.double().clone()
    Hd[7, 7] = 1.0
    Hd = Hd[P][:, P] + factor.damping * torch.eye(150, dtype=torch.float64)
    R = torch.linalg.cholesky(Hd.flip(0, 1)).flip(0, 1)  # H = R·Rᵀ, R upper
    expected = torch.linalg.solve_triangular(R, torch.eye(150, dtype=torch.float64), upper=True).float()
    assert torch.allclose(U.float(), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(U.T @ U @ Hd, torch.eye(150, dtype=torch.float64), atol=1e-4)
    assert factor.dead.tolist() == [i == 7 for i in range(150)]


def test_weights_solved_one_at_a_time_get_the_stacked_solve_codes(monkeypatch):
    """Above STACK_BYTES the weights sharing a Hessian are solved one by one: same codes and errors."""
    import lowbit.algorithms.gptq as gptq

    x = correlated_inputs(1500, 192, seed=6)
    H = hessian_of(x)
    gen = torch.Generator().manual_seed(8)
    weights = [torch.randn(rows, 192, generator=gen) * 0.02 for rows in (64, 24, 40)]
    spec = QuantSpec("int", 4, "group", 64, symmetric=False)
    stacked = gptq.gptq_quantize_group(weights, H, spec, block_size=32, act_order=True, static_groups=True)
    monkeypatch.setattr(gptq, "STACK_BYTES", 0)
    alone = gptq.gptq_quantize_group(weights, H, spec, block_size=32, act_order=True, static_groups=True)
    for a, b, W in zip(stacked, alone, weights):
        assert torch.equal(a.weight.codes(), b.weight.codes())
        assert a.error == pytest.approx(b.error, rel=1e-9)
        assert b.error == pytest.approx(output_error(W, b.weight.dequantize(), H), rel=1e-5)
        assert b.signal == pytest.approx(output_error(W, torch.zeros_like(W), H), rel=1e-5)


def test_hessian_taken_in_place_equals_the_copy():
    x = correlated_inputs(700, 600, seed=9)  # 600 columns: blocks of 256 and a ragged one
    a, b = HessianAccumulator.zeros(600), HessianAccumulator.zeros(600)
    a.add(x)
    b.add(x)
    assert torch.equal(b.take_hessian(), a.hessian())
    assert b.count == 0 and b.xtx.numel() == 0  # the accumulator gave its memory up
