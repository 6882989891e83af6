"""The packed-integer CPU kernels against the reference, on awkward shapes, and their dispatch."""

import copy
import dataclasses
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import dispatch, quantized_linear
from lowbit.kernels import cpu as cpu_kernels
from lowbit.kernels.cpu import DEQUANT_GEMM, INT_GEMV, _operands, block_rows, build_features, extension, gemv_max_m
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantSpec, get_scheme
from lowbit.tensor import QuantizedWeight, quantize_weight

pytestmark = pytest.mark.skipif(isinstance(extension(), str), reason="the C++ kernels cannot be built here")

CASES = [  # (spec, N, K): ragged last groups where the group does not divide K, N not a multiple of 4
    (QuantSpec("int", 4, "group", 128), 72, 576),
    (QuantSpec("int", 4, "group", 128, symmetric=False), 37, 1536),
    (QuantSpec("int", 4, "group", 64, symmetric=False), 40, 160),
    (QuantSpec("int", 4, "group", 32, symmetric=False, scale_dtype="bfloat16"), 40, 100),
    (QuantSpec("int", 4, "group", 8, symmetric=False), 13, 200),  # groups start inside a 16-byte step
    (QuantSpec("int", 4, "group", 40, symmetric=False), 33, 360),  # 4-bit word path: 5-word groups, tails masked
    (QuantSpec("int", 4, "group", 136), 21, 1096),  # word path, ragged last group of 8 columns
    (QuantSpec("int", 8, "channel"), 72, 96),
    (QuantSpec("int", 8, "channel"), 19, 1536),
    (QuantSpec("int", 8, "group", 64, symmetric=False), 40, 150),
    (QuantSpec("int", 2, "group", 64, symmetric=False), 40, 162),
    (QuantSpec("int", 2, "group", 16), 9, 200),
    (QuantSpec("int", 4, "channel", scale_dtype="float32"), 24, 34),
    (QuantSpec("int", 3, "group", 128, symmetric=False), 37, 1096),  # 3-byte words, ragged last group
    (QuantSpec("int", 3, "group", 32, symmetric=False), 40, 200),  # spans of whole groups, a ragged tail
    (QuantSpec("int", 3, "group", 8, scale_dtype="bfloat16"), 13, 136),
    (QuantSpec("int", 3, "group", 40), 21, 360),  # a group that does not divide 128: one group at a time
    (QuantSpec("int", 3, "channel"), 9, 72),
    (QuantSpec("nf4", 4, "group", 64), 40, 200),
    (QuantSpec("nf4", 4, "group", 64, double_quant=True), 33, 1536),  # scales decoded as read
    (QuantSpec("nf4", 4, "group", 32, double_quant=True, scale_dtype="float32"), 300, 200),  # 1875 scales: 8 blocks
    (QuantSpec("fp4", 4, "group", 32), 21, 100),
]


def check_close_to_exact(y, x, weight, bias=None):
    """y within float32 summation-order error of x @ dequant(W).T + b computed in float64."""
    w = weight.dequantize().double()
    exact = x.double().reshape(-1, w.shape[1]) @ w.T
    size = x.double().abs().reshape(-1, w.shape[1]) @ w.abs().T  # sum |x w|: the scale of rounding error
    if bias is not None:
        exact, size = exact + bias.double(), size + bias.double().abs()
    err = (y.double().reshape(exact.shape) - exact).abs()
    assert torch.isfinite(y).all()
    assert (err <= 1e-5 * size + 1e-30).all(), f"worst error {(err / (size + 1e-30)).max().item():.3g} of sum |x w|"


@pytest.mark.parametrize("spec,N,K", CASES, ids=lambda c: c.describe() if isinstance(c, QuantSpec) else str(c))
@pytest.mark.parametrize("M", [1, 2, 3, 7, 16])
def test_gemv_matches_the_reference(spec, N, K, M):
    gen = torch.Generator().manual_seed(N * K + M)
    weight = quantize_weight(torch.randn(N, K, generator=gen), spec)
    assert INT_GEMV.supports(weight, None, torch.device("cpu")) is None
    x, bias = torch.randn(M, K, generator=gen), torch.randn(N, generator=gen)
    y = INT_GEMV.run(x, INT_GEMV.prepare(weight), weight, bias, None)
    ref = quantized_linear(x, weight, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    check_close_to_exact(y, x, weight, bias)


def zero_point_allowance(x, weight):
    """Both decode paths take the zero point off in float, as s (sum c x - z sum x): rounding
    of order 2^-24 z s sum |x| that a large activation makes larger than float32's error on sum |x w| (the
    reference, dequantise then F.linear, has no such term). Bounded by 2^-20 sum_k s_k 2^bits |x_k|."""
    K = x.shape[-1]
    scales = weight.scales().double().repeat_interleave(weight.group_size, 1)[:, :K] * 2**weight.spec.bits
    return 2.0**-20 * x.double().abs() @ scales.T


def block_float_allowance(x, w):
    """x rounded to block floating point on the integer path: each value within 2^-22 of its 128-column
    block's largest magnitude, so 2^-22 sum_k |w_k| max_b(k) (w: the float64 weight)."""
    K = x.shape[-1]
    blocks = torch.nn.functional.pad(x.double().abs(), (0, (-K) % 128)).reshape(*x.shape[:-1], -1, 128)
    block_max = blocks.amax(-1).repeat_interleave(128, -1)[..., :K]
    return 2.0**-22 * block_max @ w.abs().T


def check_integer_path(weight, x):
    """The 4-bit path in integers (where the build has AVX-512 VNNI) against float64: within float32's
    error on sum |x w| plus the two allowances above; and with LOWBIT_CPU_FLOAT_GEMV=1 on the float path, within
    float32's error plus `zero_point_allowance` alone."""
    w = weight.dequantize().double()
    exact = x.double() @ w.T
    floats = 1e-5 * (x.double().abs() @ w.abs().T) + zero_point_allowance(x, weight)
    ys = {}
    for path, allowed in (("integers", floats + block_float_allowance(x, w)), ("float", floats)):
        if path == "float":
            os.environ["LOWBIT_CPU_FLOAT_GEMV"] = "1"
        try:
            ys[path] = INT_GEMV.run(x, {}, weight, None, None)
        finally:
            os.environ.pop("LOWBIT_CPU_FLOAT_GEMV", None)
        err = (ys[path].double() - exact).abs()
        assert (err <= allowed + 1e-30).all(), f"{path}: worst error {(err / (allowed + 1e-30)).max().item():.3g}"
    return ys


def test_the_build_names_the_instruction_sets_it_was_compiled_for():
    features = build_features()
    assert features <= set(cpu_kernels.BUILD_FEATURES) and features
    if platform.machine() == "x86_64" and "LOWBIT_CPU_MARCH" not in os.environ and os.path.exists("/proc/cpuinfo"):
        flags = set(open("/proc/cpuinfo").read().split())  # -march=native: what this CPU has
        assert ("vnni" in features) == ("avx512_vnni" in flags) and ("vbmi" in features) == ("avx512vbmi" in flags)
        avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
        assert ("avx512" in features) == avx512 and ("avx2" in features) == ({"avx2", "fma"} <= flags and not avx512)


@settings(max_examples=150, deadline=None)
@given(M=st.integers(1, 12), group=st.sampled_from([32, 64, 128, 256, None]), symmetric=st.booleans(),
       scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]), N=st.integers(1, 41), K=st.integers(1, 700),
       spread=st.floats(0, 12), seed=st.integers(0, 2**31 - 1))
def test_4_bit_gemv_in_integers_on_random_shapes(M, group, symmetric, scale_dtype, N, K, spread, seed):
    """x's magnitudes spread over up to 10^12 (whole blocks of tiny values beside large ones, outliers in a block),
    ragged last blocks, groups of a quarter, a half, one or two blocks of 128 columns, or the whole row; each
    of the M tokens its own blocks."""
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec("int", 4, "channel" if group is None else "group", group, symmetric, scale_dtype=scale_dtype)
    weight = quantize_weight(torch.randn(N, K, generator=gen), spec)
    x = torch.randn(M, K, generator=gen) * 10 ** (spread * (torch.rand(M, K, generator=gen) - 0.5))
    check_integer_path(weight, x)


def test_integer_path_on_blocks_of_zeros_outliers_and_extreme_magnitudes():
    gen = torch.Generator().manual_seed(7)
    for spec, K in [(QuantSpec("int", 4, "group", 128), 576), (QuantSpec("int", 4, "group", 256, False), 1096),
                    (QuantSpec("int", 4, "group", 32, False), 616), (QuantSpec("int", 4, "group", 64), 700),
                    (QuantSpec("int", 4, "channel"), 201)]:
        weight = quantize_weight(torch.randn(37, K, generator=gen), spec)
        x = torch.randn(1, K, generator=gen)
        x[0, :128] = 0  # a block of zeros
        x[0, 130] = 3e4  # a massive activation among ordinary ones
        x[0, K - 1] = 1e-40  # a subnormal beside them: its block keeps ordinary values
        ys = check_integer_path(weight, x)
        # two paths where the build has the integer one, not one run twice; one path, the same answer, elsewhere
        assert torch.equal(ys["integers"], ys["float"]) == ("vnni" not in build_features())
        for scale in (1e-42, 1e-30, 1e30):  # blocks of subnormals, tiny and huge values: no overflow, no NaN
            check_integer_path(weight, torch.randn(1, K, generator=gen) * scale)
        # tokens of all of these at once: each token's own blocks (one to four tokens a pass)
        tokens = torch.cat([x, *(torch.randn(1, K, generator=gen) * scale for scale in (1e-42, 1e-30, 1e30, 1.0))])
        ys = check_integer_path(weight, tokens)
        assert torch.equal(ys["integers"], ys["float"]) == ("vnni" not in build_features())


def test_integer_path_gives_the_float_paths_answer_for_non_finite_x(monkeypatch):
    """An inf or NaN has no block floating point form: such an x takes the float path (whose inf - inf in the
    zero point's sum makes NaN where the reference has ±inf: non-finite either way, never a finite number), the
    whole call when one of its tokens holds one."""
    weight = quantize_weight(torch.randn(16, 256), QuantSpec("int", 4, "group", 128, symmetric=False))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for M, row in ((1, 0), (5, 3)):
            x = torch.randn(M, 256)
            x[row, 200] = bad
            y = INT_GEMV.run(x, {}, weight, None, None)
            with monkeypatch.context() as m:
                m.setenv("LOWBIT_CPU_FLOAT_GEMV", "1")
                torch.testing.assert_close(y, INT_GEMV.run(x, {}, weight, None, None), rtol=0, atol=0, equal_nan=True)
            assert not torch.isfinite(y[row]).any() and not torch.isfinite(quantized_linear(x, weight)[row]).any()


def random_weight(fmt, per_channel, group_bytes, symmetric, scale_dtype, N, K, seed) -> QuantizedWeight:
    """A random weight the CPU kernels run: groups of whole bytes (of whole 3-byte words of 8 codes at 3
    bits, with K a multiple of 8 there too)."""
    double_quant = fmt == "nf4dq"
    fmt = "nf4" if double_quant else fmt
    bits = 4 if fmt in ("nf4", "fp4") else int(fmt[3:])
    if bits == 3:
        K, group = max(8, K // 8 * 8), group_bytes * 8
    else:
        group = group_bytes * (8 // bits)
    fmt_name = "int" if fmt.startswith("int") else fmt
    spec = QuantSpec(fmt_name, bits, "channel" if per_channel else "group", None if per_channel else group,
                     symmetric or fmt_name != "int", scale_dtype=scale_dtype, double_quant=double_quant)
    return quantize_weight(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)), spec)


WEIGHTS = dict(fmt=st.sampled_from(["int2", "int3", "int4", "int8", "nf4", "nf4dq", "fp4"]), per_channel=st.booleans(),
               group_bytes=st.integers(1, 80), symmetric=st.booleans(),
               scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
               N=st.integers(1, 41), K=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))


@settings(max_examples=200, deadline=None)
@given(M=st.integers(1, 16), **WEIGHTS)
def test_gemv_on_random_shapes(M, fmt, per_channel, group_bytes, symmetric, scale_dtype, N, K, seed):
    weight = random_weight(fmt, per_channel, group_bytes, symmetric, scale_dtype, N, K, seed)
    assert INT_GEMV.supports(weight, None, torch.device("cpu")) is None
    x = torch.randn(M, weight.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    check_close_to_exact(INT_GEMV.run(x, INT_GEMV.prepare(weight), weight, None, None), x, weight)


@settings(max_examples=200, deadline=None)
@given(**WEIGHTS)
def test_dequant_is_the_reference_weight_exactly(fmt, per_channel, group_bytes, symmetric, scale_dtype, N, K, seed):
    weight = random_weight(fmt, per_channel, group_bytes, symmetric, scale_dtype, N, K, seed)
    scale, extra = weight.scale, {"levels": INT_GEMV.prepare(weight).get("levels")}
    if weight.scale_scale is not None:  # double-quantised: int8 codes, decoded by the kernel as it reads them
        scale = scale.view(weight.scale_shape)
        extra.update(scale_scale=weight.scale_scale, scale_offset=weight.scale_offset)
    w = torch.ops.lowbit.dequant_cpu(weight.qdata, scale, weight.zero_point, weight.spec.bits, weight.group_size,
                                     weight.shape[1], **extra)
    assert torch.equal(w, weight.dequantize())


def stored_operands(weight: QuantizedWeight) -> tuple[tuple, dict]:
    """The ops' arguments for the codes as stored (act-order: in column order, with the g_idx), not as `prepare`
    may sort them."""
    prepared = INT_GEMV.prepare(weight)
    return _operands(weight, {"levels": prepared["levels"]} if "levels" in prepared else {})


def with_g_idx(weight: QuantizedWeight, seed: int, uneven: bool) -> QuantizedWeight:
    """The same codes and scales, their groups scattered over the columns: GPTQ act-order's g_idx (each group
    ``group_size`` columns in a random column order) or, ``uneven``, any group for any column."""
    groups, cols = weight.scale_shape[1], weight.shape[1]
    gen = torch.Generator().manual_seed(seed)
    if uneven:
        g_idx = torch.randint(0, groups, (cols,), generator=gen)
    else:
        g_idx = torch.argsort(torch.randperm(cols, generator=gen)) // weight.group_size
    return dataclasses.replace(weight, g_idx=g_idx.to(torch.int32))


@settings(max_examples=150, deadline=None)
@given(M=st.integers(1, 16), uneven=st.booleans(), **{k: v for k, v in WEIGHTS.items() if k != "per_channel"})
def test_act_order_weights_on_random_shapes(M, uneven, fmt, group_bytes, symmetric, scale_dtype, N, K, seed):
    """Scattered groups (g_idx): the GEMV (16-row blocks and a tail) against the exact product, the dequantise
    bit for bit; any number of groups (up to 150 here). GPTQ's g_idx (runs of groups once sorted), as
    `QuantLinear` keeps it — codes in group order, x's columns gathered into that order — runs on the plain
    kernels to the same product."""
    weight = with_g_idx(random_weight(fmt, False, group_bytes, symmetric, scale_dtype, N, K, seed), seed, uneven)
    assert INT_GEMV.supports(weight, None, torch.device("cpu")) is None
    x = torch.randn(M, weight.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    check_close_to_exact(INT_GEMV.run(x, INT_GEMV.prepare(weight), weight, None, None), x, weight)
    stored, extra = stored_operands(weight)
    assert "g_idx" in extra
    check_close_to_exact(torch.ops.lowbit.int_gemv_cpu(x, *stored, weight.shape[0], **extra), x, weight)
    assert torch.equal(torch.ops.lowbit.dequant_cpu(*stored, weight.shape[1], **extra), weight.dequantize())
    ordered = weight.in_group_order()
    assert (ordered is not None) == (weight.group_order()[1] is None)  # GPTQ's always; a random g_idx by chance
    assert ordered is not None or uneven
    if ordered is not None:
        perm, plain = ordered
        assert plain.g_idx is None and INT_GEMV.supports(plain, None, torch.device("cpu")) is None
        check_close_to_exact(INT_GEMV.run(x[:, perm], INT_GEMV.prepare(plain), plain, None, None), x, weight)
        packed, extra = stored_operands(plain)
        dense = torch.ops.lowbit.dequant_cpu(*packed, weight.shape[1], **extra)
        assert torch.equal(dense, weight.dequantize()[:, perm])


@pytest.mark.parametrize("groups", [7, 32, 33, 64, 65, 86, 128, 129, 200])
@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_dequantise_with_any_number_of_groups(groups, symmetric):
    """The act-order dequantise holds a row's scales in 2, 4 or 8 registers (up to 32, 64, 128 groups) and
    gathers above: every size and both edges of each, bit for bit."""
    spec = QuantSpec("int", 4, "group", 8, symmetric=symmetric)
    weight = quantize_weight(torch.randn(19, 8 * groups, generator=torch.Generator().manual_seed(groups)), spec)
    for uneven in (False, True):
        scattered = with_g_idx(weight, groups, uneven)
        packed, extra = _operands(scattered, {})
        assert torch.equal(torch.ops.lowbit.dequant_cpu(*packed, scattered.shape[1], **extra), scattered.dequantize())


@pytest.mark.parametrize("uneven", [False, True], ids=["gptq-g-idx", "any-g-idx"])
def test_act_order_layers_run_on_the_packed_kernels_not_the_reference(uneven, caplog):
    """A GPTQ act-order layer (g_idx) is served by the GEMV for decode and dequantise + GEMM for prefill
    (the reference's sums, split by rows of the weight), with nothing logged about a fallback. GPTQ's g_idx
    runs as a plain layer: the layer holds its codes in group order, once, and no kernel keeps another copy;
    any other g_idx is read in column order."""
    weight = with_g_idx(quantize_weight(torch.randn(72, 1100), QuantSpec("int", 4, "group", 32, symmetric=False)), 0,
                        uneven)
    layer = QuantLinear(weight, torch.randn(72))
    assert ("perm" in layer._buffers) == (not uneven) and ("g_idx" in layer._buffers) == uneven
    held = layer.kernel_weight
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING"):
        assert dispatch.choose(held, None, cpu, 1) is INT_GEMV
        assert dispatch.choose(held, None, cpu, 64) is DEQUANT_GEMM
        x = torch.randn(3, 1100)
        ref = quantized_linear(x, weight, layer.bias)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
        x = torch.randn(1, 64, 1100)
        check_prefill(layer(x), x, weight, layer.bias)
    assert "reference" not in caplog.text
    [prepared] = layer._memo.prepared.values()  # one layout for both kernels, holding no codes
    assert prepared == {}
    assert layer.stored_nbytes == weight.nbytes == sum(b.nbytes for b in layer.buffers())


def test_act_order_ops_check_their_g_idx():
    weight = with_g_idx(quantize_weight(torch.randn(24, 96), QuantSpec("int", 4, "group", 32)), 1, uneven=False)
    packed = (weight.qdata, weight.scale, None, 4, 32)
    torch.library.opcheck(torch.ops.lowbit.int_gemv_cpu.default, (torch.randn(2, 96), *packed, 24),
                          {"g_idx": weight.g_idx})
    torch.library.opcheck(torch.ops.lowbit.dequant_cpu.default, (*packed, 96), {"g_idx": weight.g_idx})
    with pytest.raises(RuntimeError, match="g_idx names a group outside"):
        torch.ops.lowbit.int_gemv_cpu(torch.randn(1, 96), *packed, 24, g_idx=torch.full((96,), 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"g_idx must be \(K,\) int32"):
        torch.ops.lowbit.dequant_cpu(*packed, 96, g_idx=weight.g_idx.long())
    int3 = with_g_idx(quantize_weight(torch.randn(8, 100), QuantSpec("int", 3, "group", 20)), 2, uneven=False)
    assert "multiple of 8" in INT_GEMV.supports(int3, None, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec,N,K", [*CASES[:4], *(c for c in CASES if c[0].bits == 3 or c[0].format != "int")],
                         ids=lambda c: c.describe() if isinstance(c, QuantSpec) else str(c))
def test_prefill_kernel_matches_the_reference(spec, N, K, dtype):
    gen = torch.Generator().manual_seed(N + K)
    weight = quantize_weight(torch.randn(N, K, generator=gen), spec)
    x, bias = torch.randn(2, 40, K, generator=gen).to(dtype), torch.randn(N, generator=gen)
    y = DEQUANT_GEMM.run(x, DEQUANT_GEMM.prepare(weight), weight, bias, None)
    assert y.dtype == dtype
    check_prefill(y, x, weight, bias)


def check_prefill(y, x, weight, bias=None):
    """The prefill kernel's output: the reference's sums split by rows of the weight (blocks GEMMed on worker
    threads, where torch's GEMM may order a sum differently), so within float rounding of the exact product."""
    if x.dtype == torch.float32:
        check_close_to_exact(y, x, weight, bias)
    else:
        ref = quantized_linear(x, weight, bias).float()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * scale)


@settings(max_examples=120, deadline=None)
@given(M=st.integers(0, 40), rows=st.integers(1, 48), bf16=st.booleans(), with_bias=st.booleans(),
       act_order=st.booleans(), **WEIGHTS)
def test_prefill_in_blocks_on_random_shapes(M, rows, bf16, with_bias, act_order, fmt, per_channel, group_bytes,
                                            symmetric, scale_dtype, N, K, seed):
    """Prefill dequantises `rows` rows at a time into the threads' workspaces: within float rounding of the
    exact product, and one block (rows >= N) is the reference's own call, bit for bit."""
    weight = random_weight(fmt, per_channel, group_bytes, symmetric, scale_dtype, N, K, seed)
    if act_order and not per_channel:
        weight = with_g_idx(weight, seed, uneven=False)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, M, weight.shape[1], generator=gen).to(torch.bfloat16 if bf16 else torch.float32)
    bias = torch.randn(N, generator=gen) if with_bias else None
    packed, extra = stored_operands(weight)
    y = torch.ops.lowbit.dequant_linear_cpu(x, *packed, N, **extra, bias=bias, block_rows=rows)
    assert y.shape == (2, M, N) and y.dtype == x.dtype
    if rows >= N:
        assert torch.equal(y, quantized_linear(x, weight, bias))
    else:
        check_prefill(y, x, weight, bias)


def test_prefill_blocks_are_at_least_a_few_megabytes_or_m_rows_and_shared_evenly(monkeypatch):
    """Blocks of BLOCK_BYTES of float32, or of M rows when x is the larger read (up to MAX_BLOCK_BYTES), but no
    more than an even share of BLOCKS_PER_THREAD per thread; whole 16-row steps, never fewer than 16."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    share = cpu_kernels.BLOCKS_PER_THREAD * 2
    assert block_rows(11008, 4096, 1) == cpu_kernels.BLOCK_BYTES // (4 * 4096) // 16 * 16
    assert block_rows(11008, 4096, 600) == 592  # M rows
    assert block_rows(576, 1536, 64) == 576 // share // 16 * 16  # the share: 144 rows, 4 blocks for 2 threads
    assert block_rows(28672, 8192, 2048) == cpu_kernels.MAX_BLOCK_BYTES // (4 * 8192)  # not 2048 rows: 64 MB
    assert block_rows(40, 10**6, 64) == 16  # never below one step
    for n, k, m in [(1536, 576, 64), (4096, 11008, 16), (28672, 8192, 2048)]:
        rows = block_rows(n, k, m)
        assert rows % 16 == 0 and -(-n // rows) >= min(share, n // 16)


def test_prefill_in_blocks_through_the_kernel(monkeypatch):
    """A layer larger than a block through the prefill kernel: within float rounding of the exact product, also
    under inference mode (the blocks' GEMMs run on worker threads, which take the caller's mode)."""
    monkeypatch.setattr(cpu_kernels, "BLOCK_BYTES", 64 * 1100 * 4)  # 64 rows of this layer at a time
    weight = with_g_idx(quantize_weight(torch.randn(2000, 1100), QuantSpec("int", 4, "group", 32, symmetric=False)),
                        3, uneven=False)
    x, bias = torch.randn(1, 37, 1100), torch.randn(2000)
    assert block_rows(2000, 1100, 37) == 64
    y = DEQUANT_GEMM.run(x, DEQUANT_GEMM.prepare(weight), weight, bias, None)
    check_prefill(y, x, weight, bias)
    with torch.inference_mode():
        assert torch.equal(DEQUANT_GEMM.run(x, DEQUANT_GEMM.prepare(weight), weight, bias, None), y)


def test_prefill_op_checks_its_arguments():
    weight = quantize_weight(torch.randn(40, 160), QuantSpec("int", 4, "group", 64, symmetric=False))
    packed = (weight.qdata, weight.scale, weight.zero_point, 4, 64)
    for rows in (16, 64):  # blocks, and one block
        torch.library.opcheck(torch.ops.lowbit.dequant_linear_cpu.default, (torch.randn(2, 9, 160), *packed, 40),
                              {"bias": torch.randn(40), "block_rows": rows})
    torch.library.opcheck(torch.ops.lowbit.dequant_linear_cpu.default,
                          (torch.randn(9, 160, dtype=torch.bfloat16), *packed, 40), {"block_rows": 16})
    with pytest.raises(RuntimeError, match="block_rows must be positive"):
        torch.ops.lowbit.dequant_linear_cpu(torch.randn(9, 160), *packed, 40, block_rows=0)
    with pytest.raises(RuntimeError, match=r"bias must be \(N,\)"):
        torch.ops.lowbit.dequant_linear_cpu(torch.randn(9, 160), *packed, 40, bias=torch.randn(41), block_rows=16)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.lowbit.dequant_linear_cpu(torch.randn(9, 160).double(), *packed, 40, block_rows=16)
    with pytest.raises(RuntimeError, match="scale must be float16, bfloat16, float32, or int8"):  # no float64 kernels
        torch.ops.lowbit.int_gemv_cpu(torch.randn(1, 160), weight.qdata, weight.scale.double(), weight.zero_point, 4,
                                      64, 40)


@pytest.mark.parametrize("zero_point", [False, True])
def test_custom_ops_pass_opcheck(zero_point):
    weight = quantize_weight(torch.randn(40, 160), QuantSpec("int", 4, "group", 64, symmetric=not zero_point))
    packed = (weight.qdata, weight.scale, weight.zero_point, 4, 64)
    torch.library.opcheck(torch.ops.lowbit.int_gemv_cpu.default, (torch.randn(2, 3, 160), *packed, 40))
    torch.library.opcheck(torch.ops.lowbit.dequant_cpu.default, (*packed, 160))


def test_lookup_and_3_bit_ops_pass_opcheck():
    nf4 = quantize_weight(torch.randn(40, 160), QuantSpec("nf4", 4, "group", 64))
    levels = INT_GEMV.prepare(nf4)["levels"]
    torch.library.opcheck(torch.ops.lowbit.int_gemv_cpu.default,
                          (torch.randn(2, 3, 160), nf4.qdata, nf4.scale, None, 4, 64, 40, levels))
    torch.library.opcheck(torch.ops.lowbit.dequant_cpu.default, (nf4.qdata, nf4.scale, None, 4, 64, 160, levels))
    dq = quantize_weight(torch.randn(40, 160), QuantSpec("nf4", 4, "group", 64, double_quant=True))
    packed = (dq.qdata, dq.scale.view(dq.scale_shape), None, 4, 64)
    torch.library.opcheck(torch.ops.lowbit.int_gemv_cpu.default,
                          (torch.randn(2, 160), *packed, 40, levels, dq.scale_scale, dq.scale_offset))
    torch.library.opcheck(torch.ops.lowbit.dequant_cpu.default, (*packed, 160, levels, dq.scale_scale, dq.scale_offset))
    int3 = quantize_weight(torch.randn(40, 160), QuantSpec("int", 3, "group", 32, symmetric=False))
    packed = (int3.qdata, int3.scale, int3.zero_point, 3, 32)
    torch.library.opcheck(torch.ops.lowbit.int_gemv_cpu.default, (torch.randn(5, 160), *packed, 40))
    torch.library.opcheck(torch.ops.lowbit.dequant_cpu.default, (*packed, 160))


def test_inputs_that_are_not_contiguous_or_not_float32():
    weight = quantize_weight(torch.randn(24, 96), QuantSpec("int", 4, "group", 32))
    x = torch.randn(96, 5).T  # (5, 96), column-major
    check_close_to_exact(INT_GEMV.run(x, {}, weight, None, None), x, weight)
    y = INT_GEMV.run(x.to(torch.bfloat16), {}, weight, None, None)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 24)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lowbit.int_gemv_cpu(x.double(), weight.qdata, weight.scale, None, 4, 32, 24)
    with pytest.raises(RuntimeError, match="qdata"):
        torch.ops.lowbit.int_gemv_cpu(x[:, :90], weight.qdata, weight.scale, None, 4, 32, 24)


def test_quant_linear_uses_the_gemv_for_decode_and_dequant_gemm_for_prefill(monkeypatch):
    layer = QuantLinear(quantize_weight(torch.randn(72, 576), QuantSpec("int", 4, "group", 128)))
    cpu = torch.device("cpu")
    assert dispatch.choose(layer.weight, None, cpu, 1) is INT_GEMV
    assert dispatch.choose(layer.weight, None, cpu, gemv_max_m(layer.weight)) is INT_GEMV
    assert dispatch.choose(layer.weight, None, cpu, gemv_max_m(layer.weight) + 1) is DEQUANT_GEMM
    calls = []

    def counted(kernel):
        return dispatch.Kernel(kernel.name, "cpu", kernel.supports, kernel.prepare,
                               lambda *a: calls.append(kernel.name) or kernel.run(*a), kernel.min_m, kernel.max_m)

    monkeypatch.setattr(dispatch, "_KERNELS", [counted(INT_GEMV), counted(DEQUANT_GEMM)])
    x = torch.randn(2, 3, 576)  # leading dimensions are tokens too
    torch.testing.assert_close(layer(x), quantized_linear(x, layer.weight), rtol=1e-5, atol=1e-4)
    x = torch.randn(1, 64, 576)
    check_prefill(layer(x), x, layer.weight)
    assert calls == [INT_GEMV.name, DEQUANT_GEMM.name]


@pytest.mark.parametrize("spec,act_order,last_gemv_m,last_gemv_m_avx2", [
    (QuantSpec("int", 8, "channel"), False, 8, 8),
    (QuantSpec("nf4", 4, "group", 64), False, 8, 6),
    (QuantSpec("int", 4, "group", 128), False, 12, 6),
    (QuantSpec("int", 3, "group", 64, symmetric=False), False, 16, 6),
    (QuantSpec("int", 2, "group", 64, symmetric=False), False, 8, 6),
    (QuantSpec("int", 4, "group", 64), "gptq", 12, 6),
    (QuantSpec("int", 4, "group", 64), "any", 32, 4),
], ids=lambda c: c.describe() if isinstance(c, QuantSpec) else str(c))
def test_the_decode_kernels_range_of_tokens_depends_on_the_format(spec, act_order, last_gemv_m, last_gemv_m_avx2):
    """Where the GEMV hands over to dequantise + GEMM: early for int8, int2 and NF4, later for 3/4-bit codes,
    late for act-order weights read in column order (a slow, scattered dequantise) with AVX-512; without it (the
    8-lane kernels) after 6 tokens but for int8's 8 and those act-order weights' 4. GPTQ's act-order weights run as
    plain ones (`QuantLinear` holds them in group order)."""
    weight = quantize_weight(torch.randn(40, 256), spec)
    if act_order:  # as a layer holds it: GPTQ's with the columns in group order, no g_idx
        weight = QuantLinear(with_g_idx(weight, 0, uneven=act_order == "any")).kernel_weight
        assert (weight.g_idx is None) == (act_order == "gptq")
    cpu = torch.device("cpu")
    if "avx512" not in build_features():
        last_gemv_m = last_gemv_m_avx2
    assert gemv_max_m(weight) == last_gemv_m
    assert dispatch.choose(weight, None, cpu, 1) is INT_GEMV
    assert dispatch.choose(weight, None, cpu, last_gemv_m) is INT_GEMV
    assert dispatch.choose(weight, None, cpu, last_gemv_m + 1) is DEQUANT_GEMM


@pytest.mark.parametrize("spec,K,reason", [
    (QuantSpec("fp8_e4m3", 8, "channel"), 256, "integer 2/3/4/8-bit, NF4 or FP4 weights only"),
    (QuantSpec("int", 5, "group", 64), 256, "integer 2/3/4/8-bit, NF4 or FP4 weights only"),
    (QuantSpec("int", 3, "group", 12), 96, "3-bit codes need the group size and in_features to be multiples of 8"),
    (QuantSpec("int", 3, "channel"), 100, "3-bit codes need the group size and in_features to be multiples of 8"),
], ids=lambda c: c.describe() if isinstance(c, QuantSpec) else str(c))
def test_formats_it_cannot_run_are_refused_with_a_reason(spec, K, reason):
    weight = quantize_weight(torch.randn(24, K), spec)
    assert reason in INT_GEMV.supports(weight, None, torch.device("cpu"))
    layer = QuantLinear(weight)  # and the layer still runs: on the reference kernel
    x = torch.randn(2, K)
    assert torch.equal(layer(x), quantized_linear(x, weight))


def test_3_bit_kernels_refuse_shapes_they_cannot_read():
    weight = quantize_weight(torch.randn(8, 96), QuantSpec("int", 3, "group", 12))
    with pytest.raises(RuntimeError, match="multiples of 8"):
        torch.ops.lowbit.int_gemv_cpu(torch.randn(1, 96), weight.qdata, weight.scale, None, 3, 12, 8)
    nf4 = quantize_weight(torch.randn(8, 64), QuantSpec("nf4", 4, "group", 32))
    with pytest.raises(RuntimeError, match="levels must be"):
        torch.ops.lowbit.dequant_cpu(nf4.qdata, nf4.scale, None, 4, 32, 64, torch.zeros(8))
    dq = quantize_weight(torch.randn(8, 64), QuantSpec("nf4", 4, "group", 32, double_quant=True))
    with pytest.raises(RuntimeError, match="int8 scales come with scale_scale"):
        torch.ops.lowbit.dequant_cpu(dq.qdata, dq.scale.view(8, 2), None, 4, 32, 64, torch.zeros(16))


def test_lookup_weights_keep_no_decoded_copy():
    """NF4 (double-quantised too) runs from its stored tensors: what `prepare` adds is the 16 levels."""
    weight = quantize_weight(torch.randn(256, 512), QuantSpec("nf4", 4, "group", 64, double_quant=True))
    prepared = INT_GEMV.prepare(weight)
    assert set(prepared) == {"levels"} and prepared["levels"].numel() == 16
    assert DEQUANT_GEMM.prepare(weight).keys() == prepared.keys()


PORTABLE_CHECK = textwrap.dedent("""
    import dataclasses
    import torch
    import sys
    from lowbit.kernels.cpu import DEQUANT_GEMM, INT_GEMV, build_features, extension
    from lowbit.kernels.reference import quantized_linear
    from lowbit.scheme import QuantSpec
    from lowbit.tensor import quantize_weight
    assert extension() is None, extension()
    assert build_features() == set(sys.argv[1:]), build_features()
    # words, bytes and tables; groups of 32 and 16 in whole-group steps; act-order rows of 1 to 69 groups (table
    # lookups from 1, 2 or 4 registers, or gathers)
    for spec, N, K in [(QuantSpec("int", 4, "group", 128), 37, 576), (QuantSpec("int", 8, "channel"), 19, 1536),
                       (QuantSpec("int", 2, "group", 64, symmetric=False), 9, 162),
                       (QuantSpec("int", 3, "group", 32, symmetric=False), 21, 200), (QuantSpec("nf4", 4, "group", 64), 9, 160),
                       (QuantSpec("int", 4, "group", 32), 13, 576), (QuantSpec("int", 4, "group", 16, symmetric=False), 7, 1096),
                       (QuantSpec("int", 3, "group", 128, symmetric=False), 9, 1536)]:
        w = quantize_weight(torch.randn(N, K), spec)
        gptq = (torch.argsort(torch.randperm(K)) // w.group_size).to(torch.int32)  # sorted into plain groups
        scattered = torch.randint(0, w.scale_shape[1], (K,), dtype=torch.int32)  # read in column order
        for weight in (w, dataclasses.replace(w, g_idx=gptq), dataclasses.replace(w, g_idx=scattered)):
            for M in (1, 5):
                x = torch.randn(M, K)
                ref = quantized_linear(x, weight)
                y = INT_GEMV.run(x, INT_GEMV.prepare(weight), weight, None, None)
                torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
            x = torch.randn(40, K)
            y, ref = DEQUANT_GEMM.run(x, DEQUANT_GEMM.prepare(weight), weight, None, None), quantized_linear(x, weight)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
""")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for x86-64 targets")
@pytest.mark.parametrize("march,features", [("x86-64-v3", ["avx2"]), ("x86-64-v2", [])])
def test_builds_without_avx512_match_the_reference(march, features):
    """AVX2 + FMA (the 8-lane kernels, what AMD Zen 2/3 and Intel's client CPUs run) and no vector extension
    beyond SSE4.2 (the portable loops), whatever this machine has (the AVX2 build is this machine's own where it
    has no AVX-512: the rest of this file tests it)."""
    if march == "x86-64-v3" and build_features() == {"avx2"}:
        pytest.skip("this machine's own build is the AVX2 one")
    # its own process: the build registers the same op names as this process's
    env = {**os.environ, "LOWBIT_CPU_MARCH": march}
    done = subprocess.run([sys.executable, "-c", PORTABLE_CHECK, *features], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_w8a8_runs_on_the_gemv_with_the_references_activation_quantisation():
    layer = QuantLinear(quantize_weight(torch.randn(72, 576), QuantSpec("int", 8, "channel")), torch.randn(72),
                        activations=QuantSpec("int", 8, "token", scale_dtype="float32", dynamic=True))
    cpu = torch.device("cpu")
    assert dispatch.choose(layer.weight, layer.activations, cpu, 1) is INT_GEMV
    assert dispatch.choose(layer.weight, layer.activations, cpu, 64) is DEQUANT_GEMM
    for x in (torch.randn(1, 1, 576), torch.randn(3, 576), torch.randn(1, 64, 576)):
        ref = quantized_linear(x, layer.weight, layer.bias, layer.activations)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_forward_remembers_its_kernel_until_the_registry_or_the_buffers_change(monkeypatch):
    calls = []
    counting = dispatch.Kernel("counting", "cpu", supports=lambda w, a, d: None,
                               prepare=lambda w: calls.append("prepare") or {"w": w.dequantize()},
                               run=lambda x, p, w, b, a: calls.append("run") or x @ p["w"].T)
    monkeypatch.setattr(dispatch, "_KERNELS", [counting])
    layer = QuantLinear(quantize_weight(torch.randn(24, 64), QuantSpec("int", 4, "group", 32)))
    x = torch.randn(1, 64)
    first = layer(x)
    assert calls == ["prepare", "run"]
    with dispatch.reference_only():  # a remembered choice must not outlive the kernels it chose from
        assert torch.equal(layer(x), quantized_linear(x, layer.weight))
    assert calls == ["prepare", "run"]
    assert torch.equal(layer(x), first) and calls == ["prepare", "run", "prepare", "run"]
    other = quantize_weight(torch.randn(24, 64), QuantSpec("int", 4, "group", 32))
    for name, tensor in other.tensors().items():  # replaced buffers (as loading with assign=True does)
        setattr(layer, name, tensor)
    torch.testing.assert_close(layer(x), x @ other.dequantize().T)  # prepared again from the new codes
    assert calls[-2:] == ["prepare", "run"] and len(calls) == 6
    assert copy.deepcopy(layer)._memo is None and layer._memo is not None


@pytest.mark.parametrize("case", ["plain", "bias", "bf16-bias", "bf16-x", "w8a8", "act-order"])
def test_a_layers_bound_gemv_is_the_kernels_run(case):
    """`QuantLinear` calls what the GEMV's ``bind`` made (its operands gathered once) where there is nothing to do
    per call but the op, and the kernel's ``run`` otherwise: either way the layer's output is ``run``'s, bit for
    bit, with or without a bias of either type, for float32 and bfloat16 x, and for GPTQ's act-order codes that
    the layer keeps in group order."""
    gen = torch.Generator().manual_seed(5)
    weight = quantize_weight(torch.randn(40, 96, generator=gen), QuantSpec("int", 4, "group", 32, symmetric=False))
    activations = get_scheme("W8A8").activations if case == "w8a8" else None
    if case == "act-order":
        weight = with_g_idx(weight, 0, False)
    bias = {"bias": torch.randn(40, generator=gen), "bf16-bias": torch.randn(40, generator=gen).bfloat16()}.get(case)
    layer = QuantLinear(weight, bias, activations)
    x = torch.randn(2, 96, generator=gen).to(torch.bfloat16 if case == "bf16-x" else torch.float32)
    held = layer.kernel_weight  # act-order: the codes in group order, x's columns gathered into it
    assert ("perm" in layer._buffers) == (case == "act-order") and held.g_idx is None
    prepared = INT_GEMV.prepare(held)
    assert (INT_GEMV.bind(prepared, held, activations) is None) == (case == "w8a8")
    expected = INT_GEMV.run(layer.in_kernel_order(x), prepared, held, layer.bias, activations)
    for _ in range(2):  # the call that makes the memo's entry, then the one that reuses it
        y = layer(x)
        assert y.dtype == expected.dtype and torch.equal(y, expected)


def test_a_load_of_the_kernels_that_compiles_says_so(monkeypatch, caplog):
    """A load of the C++ kernels still going after `BUILD_NOTICE_S` is compiling them (a minute): a warning says so,
    which the CLI shows by default, so a first run does not stop without a word; a load from torch's cache (16 ms
    here) says nothing."""
    import time

    import torch.utils.cpp_extension

    monkeypatch.delenv("LOWBIT_NO_CPP", raising=False)
    monkeypatch.setattr(cpu_kernels, "BUILD_NOTICE_S", 0.05)
    for seconds, said in ((0.4, True), (0.0, False)):
        monkeypatch.setattr(torch.utils.cpp_extension, "load",
                            lambda *args, seconds=seconds, **kwargs: time.sleep(seconds))
        caplog.clear()
        with caplog.at_level("WARNING", logger="lowbit.kernels.cpu"):
            assert cpu_kernels.extension.__wrapped__() is None  # the memoised function itself, run again
            time.sleep(0.2)  # past the notice's time: a cancelled one stays silent
        assert ("compiling lowbit's CPU kernels" in caplog.text) == said, seconds


FIRST_CALL_IS_PREFILL = textwrap.dedent("""
    import torch
    from lowbit.kernels.cpu import DEQUANT_GEMM
    from lowbit.kernels.reference import quantized_linear
    from lowbit.scheme import QuantSpec
    from lowbit.tensor import quantize_weight
    weight = quantize_weight(torch.randn(96, 576), QuantSpec("int", 4, "group", 128))
    x = torch.randn(40, 576)
    y = DEQUANT_GEMM.run(x, DEQUANT_GEMM.prepare(weight), weight, None, None)  # the op's first call loads it
    ref = quantized_linear(x, weight)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
""")


def test_the_prefill_op_can_be_the_first_call_in_a_process():
    # the first call goes through the loader that builds the extension; it must pass block_rows (a keyword) on
    done = subprocess.run([sys.executable, "-c", FIRST_CALL_IS_PREFILL], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 12), K=st.integers(1, 300), bits=st.sampled_from([8, 4]), spread=st.floats(0, 8),
       zeros=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_gemv_quantises_per_token_activations_as_the_reference_does(M, K, bits, spread, zeros, seed):
    """x_bits: the op's own per-token quantisation gives the very values of `fake_quantize` (the same float
    operations), so the output equals the GEMV's on the reference's quantised x bit for bit — ties that round to
    even, tokens of zeros (scale FLT_MIN) and magnitudes over 10^8 included."""
    from lowbit.tensor import fake_quantize

    gen = torch.Generator().manual_seed(seed)
    weight = quantize_weight(torch.randn(23, K, generator=gen), QuantSpec("int", 8, "channel"))
    x = torch.randn(M, K, generator=gen) * 10 ** (spread * (torch.rand(M, K, generator=gen) - 0.5))
    # token 0: amax 127, so s = 1 at 8 bits and x / s are x's own halves, exact ties for round-half-to-even
    x[0] = (torch.round(torch.randn(K, generator=gen) * 40) / 2).clamp(-126, 126)
    x[0, 0] = 127.0
    if zeros:
        x[-1] = 0
    act = QuantSpec("int", bits, "token", scale_dtype="float32", dynamic=True)
    packed, extra = _operands(weight, {})
    op = torch.ops.lowbit.int_gemv_cpu
    y = op(x, *packed, 23, **extra, x_bits=bits)
    assert torch.equal(y, op(fake_quantize(x, act), *packed, 23, **extra))
    assert torch.equal(y, INT_GEMV.run(x, {}, weight, None, act))  # the layer passes x_bits


def test_per_token_quantisation_in_the_op_keeps_non_finite_tokens_non_finite():
    from lowbit.tensor import fake_quantize

    weight = quantize_weight(torch.randn(8, 64), QuantSpec("int", 8, "channel"))
    packed, extra = _operands(weight, {})
    act = QuantSpec("int", 8, "token", scale_dtype="float32", dynamic=True)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, 64)
        x[1, 5] = bad
        y = torch.ops.lowbit.int_gemv_cpu(x, *packed, 8, **extra, x_bits=8)
        ref = torch.ops.lowbit.int_gemv_cpu(fake_quantize(x, act), *packed, 8, **extra)
        torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
        assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2]]).all()
    with pytest.raises(RuntimeError, match="x_bits"):
        torch.ops.lowbit.int_gemv_cpu(torch.randn(1, 64), *packed, 8, **extra, x_bits=9)
