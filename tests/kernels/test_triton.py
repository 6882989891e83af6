"""The Triton kernels against the reference quantised linear, under Triton's interpreter on CPU.

TRITON_INTERPRET must be "1" when ``@triton.jit`` runs, i.e. when lowbit's kernel module
is first imported; lowbit imports it at the first launch, never with the package, so
setting it here works whichever test file imported torch or lowbit first (and
`test_the_kernels_run_where_the_tests_expect` checks it). With a GPU and
TRITON_INTERPRET=0 the same tests run on CUDA.

Outputs are compared elementwise, |out − ref| ≤ tol · (|ref| + rms(ref)) with tol a few
roundings of the output dtype, after the kernel wrote into a NaN-filled buffer: a
skipped tile, a wrong group, zero point or scale fails.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.formats import num_groups, unpack  # noqa: E402
from lowbit.kernels.reference import quantized_linear  # noqa: E402
from lowbit.kernels.triton import (  # noqa: E402
    BlockConfig,
    available,
    nf4_linear,
    nf4_unsupported,
    prepare_nf4,
    prepare_w4a16,
    prepare_w8a8,
    w4a16_linear,
    w4a16_unsupported,
    w8a8_linear,
    w8a8_unsupported,
)
from lowbit.kernels.triton.ops import launch_int4, launch_w8a8, quantize_rows  # noqa: E402
from lowbit.scheme import QuantSpec, get_scheme  # noqa: E402
from lowbit.tensor import QuantizedWeight, from_int_codes, quantize_weight  # noqa: E402
from reference_check import check as _check  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
W8A8_ACT = get_scheme("W8A8").activations


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, seed: int, bias: bool):
    gen = _gen(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, b


def _cpu_reference(x: torch.Tensor, w: QuantizedWeight, b: torch.Tensor | None, activations: QuantSpec | None):
    """`quantized_linear` on the CPU: on a GPU, cuBLAS's own rounding (reduced-precision reductions,
    other summation orders) would put the reference further from the exact product than the
    W8A8 kernel's exact integer accumulation is."""
    cpu = QuantizedWeight.from_tensors({k: v.cpu() for k, v in w.tensors().items()}, w.shape, w.spec)
    return quantized_linear(x.cpu(), cpu, None if b is None else b.cpu(), activations)


def _on_device(w: QuantizedWeight) -> QuantizedWeight:
    moved = {k: v.to(DEVICE) for k, v in w.tensors().items()}
    return QuantizedWeight.from_tensors(moved, w.shape, w.spec)


# -- weights --------------------------------------------------------------------------------------

def _act_order(n: int, k: int, spec: QuantSpec, seed: int) -> QuantizedWeight:
    """A GPTQ act-order weight: groups of ``group_size`` columns taken in a random column order."""
    gen = _gen(seed)
    W = torch.randn(n, k, generator=gen)
    order = torch.randperm(k, generator=gen)
    wq = quantize_weight(W[:, order], spec)  # groups are runs of the permuted columns
    codes = torch.empty(n, k, dtype=torch.int32)
    codes[:, order] = wq.codes()
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // spec.group_size
    return from_int_codes(codes, wq.scale, wq.zero_points(), spec, g_idx)


def _uneven_groups(n: int, k: int, spec: QuantSpec, seed: int) -> QuantizedWeight:
    """Random codes, scales and zero points, and a g_idx with groups of unequal sizes."""
    gen = _gen(seed)
    g = num_groups(k, spec.group_size)
    lo = -8 if spec.symmetric else 0
    codes = torch.randint(lo, lo + 16, (n, k), generator=gen, dtype=torch.int32)
    scale = (torch.rand(n, g, generator=gen) * 0.1 + 0.01).half()
    zero = None if spec.symmetric else torch.randint(0, 16, (n, g), generator=gen, dtype=torch.int32)
    g_idx = torch.randint(0, g, (k,), generator=gen)
    return from_int_codes(codes, scale, zero, spec, g_idx)


def _int4(group: int | None, symmetric: bool) -> QuantSpec:
    if group is None:
        return QuantSpec("int", 4, "channel", symmetric=symmetric)
    return QuantSpec("int", 4, "group", group, symmetric=symmetric)


# (name, K, N, spec, how the weight is made): K and N off powers of two, groups ragged where K allows
W4A16_CASES = [
    ("K96-g32-sym", 96, 40, _int4(32, True), "rtn"),
    ("K160-g64-asym-ragged", 160, 72, _int4(64, False), "rtn"),
    ("K576-g128-sym-ragged", 576, 40, _int4(128, True), "rtn"),
    ("K576-g256-asym-ragged", 576, 40, _int4(256, False), "rtn"),
    ("K100-g32-sym-ragged", 100, 40, _int4(32, True), "rtn"),
    ("K160-channel-asym", 160, 40, _int4(None, False), "rtn"),
    ("K160-g32-asym-act-order", 160, 72, _int4(32, False), "act_order"),
    ("K96-g32-sym-act-order-uneven", 96, 40, _int4(32, True), "uneven"),
    ("K160-g64-asym-bf16-scales", 160, 72, _int4(64, False).replace(scale_dtype="bfloat16"), "rtn"),
]
_MAKERS = {
    "rtn": lambda n, k, spec, seed: quantize_weight(torch.randn(n, k, generator=_gen(seed)), spec),
    "act_order": _act_order,
    "uneven": _uneven_groups,
}


def _w4a16_weight(case, seed: int = 0) -> QuantizedWeight:
    _, k, n, spec, how = case
    return _on_device(_MAKERS[how](n, k, spec, seed))


# -- W4A16 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("case", W4A16_CASES, ids=[c[0] for c in W4A16_CASES])
def test_w4a16_matches_the_reference(case, m, dtype):
    w = _w4a16_weight(case)
    p = prepare_w4a16(w)
    n, k = w.shape
    x, b = _inputs(m, k, n, dtype, seed=m, bias=m > 1)
    out = _poisoned(m, n, dtype)
    launch_int4(out, x, p["qweight"], p["scales"], p.get("zeros"), None, p.get("perm"), p.get("g_idx"), b,
                w.group_size)
    _check(out, quantized_linear(x, w, b))


def test_a_cuda_config_the_cuda_kernel_cannot_take_runs_the_launchers_choice():
    """float32 x (and, under the interpreter, the CPU) is not for `lowbit.kernels.cuda`: the launcher's own config runs."""
    w = quantize_weight(torch.randn(48, 256, generator=_gen(5)), QuantSpec("int", 4, "group", 128))
    p = prepare_w4a16(w)
    x, b = _inputs(3, 256, 48, torch.float32, seed=5, bias=True)
    out = _poisoned(3, 48, torch.float32)
    launch_int4(out, x, p["qweight"], p["scales"], None, None, None, None, b, 128,
                BlockConfig(8, 32, 128, 2, 4, 1, backend="cuda"))
    _check(out, quantized_linear(x, w, b))


def test_asking_for_the_cuda_kernel_where_it_cannot_run_runs_the_launchers_choice(monkeypatch):
    monkeypatch.setenv("LOWBIT_CUDA_KERNELS", "1")
    w = quantize_weight(torch.randn(32, 256, generator=_gen(6)), QuantSpec("int", 4, "group", 128, symmetric=False))
    p = prepare_w4a16(w)
    x, _ = _inputs(2, 256, 32, torch.bfloat16 if not INTERPRET else torch.float32, seed=6, bias=False)
    out = _poisoned(2, 32, x.dtype)
    launch_int4(out, x, p["qweight"], p["scales"], p["zeros"], None, None, None, None, 128)
    _check(out, quantized_linear(x, w))


def test_act_order_with_runs_of_group_size_needs_only_a_permutation():
    regular = prepare_w4a16(_w4a16_weight(W4A16_CASES[6]))
    uneven = prepare_w4a16(_w4a16_weight(W4A16_CASES[7]))
    assert "perm" in regular and "g_idx" not in regular
    assert "perm" in uneven and "g_idx" in uneven


# Every code path of the 4-bit kernels on one ragged weight (K 320 = 2.5 groups of 128, 40 words per row; the
# interpreter's time grows with K's blocks, so K is no longer than the ragged cases need).
CONFIGS = [
    BlockConfig(1, 32, 128, split_k=2, backend="gemv"),  # GEMV, per-block scales, K split (atomics)
    BlockConfig(1, 16, 256, backend="gemv", prefetch=False),  # a block spans two groups: per-word scales
    BlockConfig(1, 64, 64, split_k=3, backend="gemv", num_warps=2),  # ragged: the last split is short
    BlockConfig(1, 32, 128, backend="gemv", xplanes=True),  # x laid out per nibble plane first
    BlockConfig(16, 32, 128, split_k=2, backend="mma"),  # codes in K order, one dot per block
    BlockConfig(16, 16, 128, backend="mma", planes=1),  # one dot per nibble plane
    BlockConfig(32, 64, 64, backend="mma", magic=False, group_m=2),  # codes converted plainly
    BlockConfig(16, 32, 128, split_k=2, backend="mma", planes=2),  # codes decoded and scaled in x's dtype
    BlockConfig(16, 32, 64, split_k=3),  # general kernel: per-block scales, K split three ways
    BlockConfig(16, 64, 256),  # general kernel, a K block spans two groups: scales gathered per column
    BlockConfig(16, 32, 32, split_k=2, group_m=2),  # several row tiles in grouped order
    BlockConfig(64, 16, 128, num_warps=2),
    BlockConfig(32, 32, 64, backend="gemm"),  # x-left tiled GEMM, words interleaved into K order
    BlockConfig(16, 64, 128, split_k=2, backend="gemm", unpack=1, group_m=2),  # each element loads its word
    BlockConfig(64, 16, 32, split_k=3, backend="gemm", num_warps=2),  # ragged splits, row tiles > M
    BlockConfig(16, 32, 64, backend="dequant"),
    BlockConfig(16, 16, 256, backend="dequant"),  # K blocks past the end of a row
    BlockConfig(16, 32, 64, backend="dequant", chunk_n=32),  # 72 rows in chunks of 32, 32 and 8
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4a16_block_configs(config, symmetric):
    spec = _int4(128, symmetric)
    w = _on_device(quantize_weight(torch.randn(72, 320, generator=_gen(1)), spec))
    p = prepare_w4a16(w)
    # 17 tokens: a full row tile of 16 and a ragged one (the interpreter's time grows with the tiles)
    calls = ((1, torch.float32), (17, torch.float32), (17, torch.bfloat16), (3, torch.float16))
    if config.backend == "gemv":  # one program per token: few tokens (the interpreter runs programs one by one)
        calls = ((1, torch.float32), (2, torch.bfloat16), (3, torch.float16))
    for m, dtype in calls:
        x, b = _inputs(m, 320, 72, dtype, seed=2, bias=True)
        out = _poisoned(m, 72, dtype)
        launch_int4(out, x, p["qweight"], p["scales"], p.get("zeros"), None, None, None, b, 128, config=config)
        _check(out, quantized_linear(x, w, b))


GEMM_CASES = [W4A16_CASES[i] for i in (0, 1, 4, 5, 8)]  # K 96, 160 ragged, 100 (not a multiple of 8), channel


@pytest.mark.parametrize("case", GEMM_CASES, ids=[c[0] for c in GEMM_CASES])
def test_w4_gemm_and_chunked_dequant_on_awkward_shapes(case):
    """The x-left GEMM, the scaled-decode tensor-core kernel and the chunked dequantise + GEMM on K not a
    multiple of the block (or of 8), N not of the tile, asymmetric zero points."""
    w = _w4a16_weight(case, seed=5)
    p = prepare_w4a16(w)
    n, k = w.shape
    for config in (BlockConfig(16, 32, 32, backend="gemm"), BlockConfig(16, 32, 32, split_k=2, backend="mma", planes=2),
                   BlockConfig(32, 16, 32, split_k=2, backend="gemm", unpack=1),
                   BlockConfig(16, 16, 32, backend="dequant", chunk_n=24)):
        for m, dtype in ((7, torch.bfloat16), (5, torch.float32)):
            x, b = _inputs(m, k, n, dtype, seed=m, bias=True)
            out = _poisoned(m, n, dtype)
            launch_int4(out, x, p["qweight"], p["scales"], p.get("zeros"), None, None, None, b, w.group_size,
                        config=config)
            _check(out, quantized_linear(x, w, b))


def test_configs_a_call_cannot_take_fall_back_to_the_general_kernel():
    """A pinned mma config whose K block spans groups (128 > 32), or a GEMV config on an uneven act-order
    weight, still computes the right product."""
    for case, config in ((W4A16_CASES[0], BlockConfig(16, 32, 128, backend="mma")),
                         (W4A16_CASES[7], BlockConfig(1, 32, 128, backend="gemv"))):
        w = _w4a16_weight(case)
        p = prepare_w4a16(w)
        n, k = w.shape
        x, _ = _inputs(2, k, n, torch.float32, seed=4, bias=False)
        out = _poisoned(2, n, torch.float32)
        launch_int4(out, x, p["qweight"], p["scales"], p.get("zeros"), None, p.get("perm"), p.get("g_idx"), None,
                    w.group_size, config=config)
        _check(out, quantized_linear(x, w))


def test_w4a16_op_equals_its_launcher_and_keeps_leading_dims():
    w = _w4a16_weight(W4A16_CASES[1])
    p = prepare_w4a16(w)
    x = torch.randn(2, 3, 160, generator=_gen(3)).to(DEVICE, torch.float16)
    y = w4a16_linear(x, p, w.group_size)
    out = _poisoned(6, 72, torch.float16)
    launch_int4(out, x, p["qweight"], p["scales"], p["zeros"], None, None, None, None, w.group_size)
    assert y.shape == (2, 3, 72) and torch.equal(y.reshape(6, 72), out)
    _check(y, quantized_linear(x, w))


def test_prepared_4bit_layout_holds_the_codes_in_as_many_bytes():
    for case in (W4A16_CASES[1], W4A16_CASES[4], W4A16_CASES[6]):  # K = 160; K = 100 (not a multiple of 8); act-order
        w = _w4a16_weight(case)
        p = prepare_w4a16(w)
        n, k = w.shape
        assert p["qweight"].dtype == torch.int32 and p["qweight"].shape == (n, (k + 7) // 8)
        assert p["qweight"].nbytes <= w.qdata.nbytes + 4 * n  # at most a word of padding per row
        codes = unpack(p["qweight"], 4, k)  # (N, K) stored codes, kernel column order
        expected = unpack(w.qdata, 4, k)
        if "perm" in p:
            expected = expected[:, p["perm"].long()]
        assert torch.equal(codes, expected)
        assert torch.equal(p["scales"], w.scale.T)
        assert all(not t.is_floating_point() or t.numel() <= w.scale.numel() for t in p.values())
        # whole words per row and no permutation: the stored bytes themselves, not a copy
        shares = p["qweight"].untyped_storage().data_ptr() == w.qdata.untyped_storage().data_ptr()
        assert shares == (k % 8 == 0 and "perm" not in p)


def test_the_4bit_kernels_read_their_operands_through_their_strides():
    w = _w4a16_weight(W4A16_CASES[1])  # asymmetric: words, scales and zero points in other layouts
    p = prepare_w4a16(w)
    n, k = w.shape
    padded = torch.zeros(n, p["qweight"].shape[1] + 3, dtype=torch.int32, device=DEVICE)
    padded[:, :p["qweight"].shape[1]] = p["qweight"]
    other = {"qweight": padded[:, :p["qweight"].shape[1]], "scales": w.scale.T, "zeros": p["zeros"].T.contiguous().T}
    assert all(not t.is_contiguous() and torch.equal(t, p[name]) for name, t in other.items())
    for config in (None, BlockConfig(1, 32, 64, backend="gemv"), BlockConfig(16, 32, 64, backend="mma"),
                   BlockConfig(16, 32, 64), BlockConfig(16, 32, 64, backend="dequant")):
        m = 1 if config is None else 5
        x = torch.randn(m, k, generator=_gen(21)).to(DEVICE)
        outs = []
        for layout in (p, other):
            out = _poisoned(m, n, torch.float32)
            launch_int4(out, x, layout["qweight"], layout["scales"], layout["zeros"], None, None, None, None,
                        w.group_size, config=config)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), config
        _check(outs[0], quantized_linear(x, w))


# -- NF4 ------------------------------------------------------------------------------------------

NF4_CASES = [
    ("K160-g64-ragged", 160, 72, QuantSpec("nf4", 4, "group", 64)),
    ("K96-g32-double-quant", 96, 40, QuantSpec("nf4", 4, "group", 32, double_quant=True)),
    ("K576-g128-double-quant-ragged", 576, 40, QuantSpec("nf4", 4, "group", 128, double_quant=True)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("case", NF4_CASES, ids=[c[0] for c in NF4_CASES])
def test_nf4_matches_the_reference(case, m, dtype):
    _, k, n, spec = case
    w = _on_device(quantize_weight(torch.randn(n, k, generator=_gen(4)), spec))
    p = prepare_nf4(w)
    assert p["scales"].dtype == (torch.float32 if spec.double_quant else torch.float16)
    x, b = _inputs(m, k, n, dtype, seed=m, bias=m > 1)
    out = _poisoned(m, n, dtype)
    launch_int4(out, x, p["qweight"], p["scales"], None, p["levels"], None, None, b, w.group_size)
    _check(out, quantized_linear(x, w, b))


# -- W8A8 -----------------------------------------------------------------------------------------

W8A8_CASES = [
    ("K160-N72-channel", 160, 72, QuantSpec("int", 8, "channel")),
    ("K576-N40-channel", 576, 40, QuantSpec("int", 8, "channel")),
    ("K96-N40-tensor", 96, 40, QuantSpec("int", 8, "tensor")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 33, 70])  # 70 > 64: activations quantised by their own kernel first
@pytest.mark.parametrize("case", W8A8_CASES, ids=[c[0] for c in W8A8_CASES])
def test_w8a8_matches_the_reference(case, m, dtype):
    _, k, n, spec = case
    w = _on_device(quantize_weight(torch.randn(n, k, generator=_gen(5)), spec))
    p = prepare_w8a8(w)
    x, b = _inputs(m, k, n, dtype, seed=m, bias=m != 7)
    out = _poisoned(m, n, dtype)
    launch_w8a8(out, x, p["weight"], p["scale"], b)
    _check(out, _cpu_reference(x, w, b, W8A8_ACT))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-quant", "quant-kernel"])
@pytest.mark.parametrize("config", [BlockConfig(16, 32, 64, split_k=3), BlockConfig(32, 64, 32, group_m=2)], ids=str)
def test_w8a8_block_configs(config, fused):
    w = _on_device(quantize_weight(torch.randn(72, 576, generator=_gen(6)), get_scheme("W8A8").weights))
    p = prepare_w8a8(w)
    x, b = _inputs(33, 576, 72, torch.float32, seed=7, bias=True)
    out = _poisoned(33, 72, torch.float32)
    launch_w8a8(out, x, p["weight"], p["scale"], b, config=config, fused_quant=fused)
    _check(out, _cpu_reference(x, w, b, W8A8_ACT))


def test_per_token_quantisation_gives_the_reference_codes_exactly():
    """Same scale bits and codes as fake_quantize, ties rounded half to even, a zero row kept finite."""
    x = torch.randn(6, 300, generator=_gen(8))
    x[1] = 0.0
    x[2, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # scale 1: exact ties
    x[2, 6:] = 0.25
    for dtype in DTYPES:
        xd = x.to(DEVICE, dtype)
        q, s = quantize_rows(xd)
        xf = xd.float().cpu()
        scale = (xf.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).smallest_normal)
        codes = torch.round(xf / scale[:, None]).clamp(-128, 127).to(torch.int8)
        assert torch.equal(s.cpu(), scale) and torch.equal(q.cpu(), codes)
        assert q[2, :6].tolist() == [127, 0, 2, 2, 0, -2]
        deq = (q.float() * s[:, None]).to(dtype).cpu()
        assert torch.equal(deq, quantized_linear(xd, _identity_int8(300), None, W8A8_ACT).cpu())


def _identity_int8(k: int) -> QuantizedWeight:
    """An int8 weight that dequantises to the identity, so the reference returns q(x) itself."""
    return _on_device(quantize_weight(torch.eye(k), QuantSpec("int", 8, "channel", scale_dtype="float32")))


# -- ops, support checks, compilation ---------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _op_cases():
    """(op, args, N) per op, with and without the optional tensors."""
    w4 = _w4a16_weight(W4A16_CASES[6])  # asym, act-order
    p4 = prepare_w4a16(w4)
    wn = _on_device(quantize_weight(torch.randn(40, 96, generator=_gen(9)), NF4_CASES[1][3]))
    pn = prepare_nf4(wn)
    w8 = _on_device(quantize_weight(torch.randn(40, 96, generator=_gen(10)), get_scheme("W8A8").weights))
    p8 = prepare_w8a8(w8)
    x160, x96 = (torch.randn(3, k, generator=_gen(11)).to(DEVICE, torch.float16) for k in (160, 96))
    b72, b40 = (torch.randn(n, generator=_gen(12)).to(DEVICE, torch.float16) for n in (72, 40))
    return {
        "w4a16": (torch.ops.lowbit.w4a16_triton.default,
                  (x160, p4["qweight"], p4["scales"], p4["zeros"], p4["perm"], None, b72, 32), 72),
        "w4a16-no-options": (torch.ops.lowbit.w4a16_triton.default,
                             (x160, p4["qweight"], p4["scales"], None, None, None, None, 32), 72),
        "nf4": (torch.ops.lowbit.nf4_triton.default,
                (x96, pn["qweight"], pn["scales"], pn["levels"], None, None, b40, 32), 40),
        "w8a8": (torch.ops.lowbit.w8a8_triton.default, (x96, p8["weight"], p8["scale"], b40), 40),
    }


@pytest.mark.parametrize("name", ["w4a16", "w4a16-no-options", "nf4", "w8a8"])
def test_ops_pass_opcheck(name):
    op, args, n = _op_cases()[name]
    torch.library.opcheck(op, args)
    with torch.device("meta"):  # the fake implementation gives shape and dtype only
        meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert meta.shape == (3, n) and meta.dtype == args[0].dtype and meta.device.type == "meta"


def test_prepared_calls_match_the_reference():
    w = _on_device(quantize_weight(torch.randn(40, 96, generator=_gen(13)), NF4_CASES[1][3]))
    x = torch.randn(5, 96, generator=_gen(14)).to(DEVICE, torch.bfloat16)
    _check(nf4_linear(x, prepare_nf4(w), w.group_size), quantized_linear(x, w))
    w8 = _on_device(quantize_weight(torch.randn(40, 96, generator=_gen(15)), get_scheme("W8A8").weights))
    _check(w8a8_linear(x, prepare_w8a8(w8)), _cpu_reference(x, w8, None, W8A8_ACT))


def test_unsupported_weights_are_named_not_run():
    w3 = quantize_weight(torch.randn(8, 64), QuantSpec("int", 3, "group", 32))
    nf4 = quantize_weight(torch.randn(8, 64), QuantSpec("nf4", 4, "group", 32))
    int8 = quantize_weight(torch.randn(8, 64), get_scheme("W8A8").weights)
    assert "int4" in w4a16_unsupported(w3, None)
    assert w4a16_unsupported(nf4, None) is not None and nf4_unsupported(nf4, None) is None
    assert "activations" in w4a16_unsupported(quantize_weight(torch.randn(8, 64), _int4(32, True)), W8A8_ACT)
    assert w8a8_unsupported(int8, W8A8_ACT) is None
    assert "activations" in w8a8_unsupported(int8, None)
    assert "float32" in w8a8_unsupported(int8, W8A8_ACT.replace(scale_dtype="float16"))
    assert "per-token" in w8a8_unsupported(int8, W8A8_ACT.replace(granularity="tensor"))
    with pytest.raises(LowbitError, match="W4A16"):
        prepare_w4a16(w3)
    with pytest.raises(LowbitError, match="NF4"):
        prepare_nf4(int8)


def test_launchers_refuse_operands_they_would_misread():
    w = _w4a16_weight(W4A16_CASES[0])
    p = prepare_w4a16(w)
    x = torch.randn(2, 96, generator=_gen(16)).to(DEVICE)
    bias = torch.zeros(80, device=DEVICE)[::2]  # 40 values, stride 2
    with pytest.raises(LowbitError, match="bias must be contiguous"):
        launch_int4(_poisoned(2, 40, torch.float32), x, p["qweight"], p["scales"], None, None, None, None, bias, 32)
    with pytest.raises(LowbitError, match="float16, bfloat16 or float32"):
        launch_int4(_poisoned(2, 40, torch.float32), x.double(), p["qweight"], p["scales"], None, None, None, None,
                    None, 32)
    with pytest.raises(LowbitError, match="unit stride along its words"):
        launch_int4(_poisoned(2, 40, torch.float32), x, p["qweight"].T.contiguous().T, p["scales"], None, None, None,
                    None, None, 32)


def test_the_kernels_run_where_the_tests_expect():
    from lowbit.kernels.triton import jit

    assert available()
    assert jit.INTERPRETED == INTERPRET  # TRITON_INTERPRET was in force when the kernels were built


@pytest.mark.skipif(not INTERPRET, reason="the compile check is for machines without a GPU")
def test_the_kernels_compile_for_sm90():
    """Every variant the launchers pick on a LLaMA shape builds for an H100 and uses tensor cores."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "lowbit.kernels.triton.aot", "--tokens", "1,16,2048",
                           "--shapes", "4096x11008"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(done.stdout)
    names = [r["variant"] for r in records]
    assert sum(name.startswith("quantize_rows") for name in names) == 1
    for backend in ("gemv", "mma", "dequant", "triton"):
        assert any(f"backend='{backend}'" in name for name in names), backend
    fused = [r for r in records if "backend='triton'" in r["variant"] or "backend='mma'" in r["variant"]]
    assert len(fused) >= 6 and all(r["mma"] for r in fused)  # the fused GEMMs run on tensor cores
    assert all(r["wgmma"] for r in fused if "block_m=256" in r["variant"])  # prefill tiles: Hopper wgmma
    assert not any(r["mma"] for r in records if "backend='gemv'" in r["variant"])  # the GEMV: CUDA cores only
