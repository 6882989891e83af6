"""Compile the kernels for a GPU architecture on a machine without one: ``python -m lowbit.kernels.triton.aot``.

Triton's compiler (front end, LLVM and the ptxas it ships) needs no GPU, so this checks
that every kernel variant the launchers pick for the LLaMA linear shapes builds for,
say, an H100 (sm_90), and reports whether the GEMM lowered to tensor-core instructions
(``mma`` / ``wgmma`` in the PTX). It runs without TRITON_INTERPRET (the interpreter
accepts programs the compiler refuses). It says nothing about speed or about results on
the device; ``bench/gpu_kernels.py`` does, where a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.kernels.triton.ops import BlockConfig, int4_config, w8a8_config

_TYPES = {"float16": "fp16", "bfloat16": "bf16"}
SHAPES = ((4096, 11008), (11008, 4096))  # (K, N): the kernels see shapes only through their configs
TOKENS = (1, 16, 64, 256, 2048)


def _constexpr(signature: dict[str, str], constants: dict[str, object], **pointers: str | None) -> None:
    for name, kind in pointers.items():
        signature[name] = kind if kind is not None else "constexpr"
        if kind is None:
            constants[name] = None


def _int4_source(jit, dtype: str, decode: int, per_block: bool, gidx: bool, bias: bool, cfg: BlockConfig,
                 group: int):
    from triton.compiler import ASTSource

    t = _TYPES[dtype]
    sig = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32",
           **{f"stride_{a}": "i32" for a in ("wk", "wn", "sg", "sn", "zg", "zn")}, "SPLIT_K": "i32"}
    const = {"GROUP": group, "DECODE": decode, "PER_BLOCK": per_block, "HAS_GIDX": gidx, "HAS_BIAS": bias,
             "ATOMIC": cfg.split_k > 1, "IEEE": False, "UPCAST": False, "UNPACK": cfg.unpack, "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
    _constexpr(sig, const, x_ptr=f"*{t}", w_ptr="*i32", s_ptr="*fp16" if decode != 2 else "*fp32",
               z_ptr="*u8" if decode == 1 else None, g_ptr="*i32" if gidx else None,
               lut_ptr="*fp32" if decode == 2 else None, b_ptr=f"*{t}" if bias else None,
               out_ptr="*fp32" if cfg.split_k > 1 else f"*{t}")
    sig.update({k: "constexpr" for k in const if k not in sig})
    return ASTSource(jit.int4_matmul_kernel, sig, const)


def _w8a8_source(jit, dtype: str, fused: bool, bias: bool, cfg: BlockConfig):
    from triton.compiler import ASTSource

    t = _TYPES[dtype]
    sig = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "SPLIT_K": "i32"}
    const = {"FUSED_QUANT": fused, "HAS_BIAS": bias, "ATOMIC": cfg.split_k > 1, "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
    _constexpr(sig, const, x_ptr=f"*{t}" if fused else "*i8", xs_ptr=None if fused else "*fp32", w_ptr="*i8",
               ws_ptr="*fp32", b_ptr=f"*{t}" if bias else None, out_ptr="*fp32" if cfg.split_k > 1 else f"*{t}")
    sig.update({k: "constexpr" for k in const if k not in sig})
    return ASTSource(jit.w8a8_matmul_kernel, sig, const)


def _new4_source(jit, dtype: str, decode: int, bias: bool, cfg: BlockConfig, group: int, k: int):
    """The N-major 4-bit kernels: `w4_gemv_kernel`, `w4_mma_kernel`, `w4_gemm_kernel`, `dequant_nk_kernel`."""
    from triton.compiler import ASTSource

    t = _TYPES[dtype]
    words = cfg.block_k // 8
    ints = ["N", "K", "stride_wn", "stride_sg", "stride_sn", "stride_zg", "stride_zn"]
    const = {"GROUP": group, "DECODE": decode, "EVEN_K": (k // 8) % words == 0}
    ptrs = dict(w_ptr="*i32", s_ptr="*fp16" if decode != 2 else "*fp32", z_ptr="*u8" if decode == 1 else None)
    if cfg.backend == "dequant":
        fn = jit.dequant_nk_kernel
        const.update(HAS_GIDX=False, BLOCK_N=cfg.block_n, WORDS=words)
        ptrs.update(g_ptr=None, lut_ptr="*fp32" if decode == 2 else None, out_ptr=f"*{t}")
    else:
        out_t = "*fp32" if cfg.split_k > 1 else f"*{t}"
        const.update(HAS_BIAS=bias, ATOMIC=cfg.split_k > 1, BLOCK_N=cfg.block_n, WORDS=words)
        ptrs.update(x_ptr=f"*{t}", b_ptr=f"*{t}" if bias else None, out_ptr=out_t)
        ints += ["stride_xm", "stride_om", "SPLIT_K"]
        if cfg.backend == "gemv":
            fn = jit.w4_gemv_kernel
            const.update(PER_BLOCK=group % cfg.block_k == 0, PREFETCH=cfg.prefetch, XPLANES=cfg.xplanes)
            ptrs.update(lut_ptr="*fp32" if decode == 2 else None)
        elif cfg.backend == "gemm":
            fn = jit.w4_gemm_kernel
            ints.append("M")
            const.update(UNPACK=cfg.unpack, UPCAST=False, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                         GROUP_M=cfg.group_m)
            const.pop("WORDS")
        else:
            fn = jit.w4_mma_kernel
            ints.append("M")
            const.update(PLANES=cfg.planes, MAGIC=cfg.magic, UPCAST=False, BLOCK_T=cfg.block_m, GROUP_N=cfg.group_m)
    sig = {name: "i32" for name in ints}
    _constexpr(sig, const, **ptrs)
    sig.update({name: "constexpr" for name in const if name not in sig})
    # what the JIT assumes of these arguments on the bench shapes (multiples of 16): 16-byte vector loads
    names = list(fn.arg_names)
    aligned = [a for a in ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "N", "K", "stride_xm", "stride_om", "stride_wn",
                           "stride_sg") if sig.get(a) not in (None, "constexpr")]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return ASTSource(fn, sig, const, attrs=attrs)


def _4bit_source(jit, dtype: str, decode: int, gidx: bool, bias: bool, cfg: BlockConfig, group: int, k: int):
    """The kernel the 4-bit launcher runs for this config (GEMV, tensor-core, general fused, or the dequantise step)."""
    if cfg.backend in ("gemv", "mma", "gemm", "dequant"):
        return _new4_source(jit, dtype, decode, bias, cfg, group, k)
    return _int4_source(jit, dtype, decode, not gidx, gidx, bias, cfg, group)


def _quant_source(jit, dtype: str):
    from triton.compiler import ASTSource

    sig = {"x_ptr": f"*{_TYPES[dtype]}", "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32", "K": "i32",
           "stride_xm": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
    return ASTSource(jit.quantize_rows_kernel, sig, {"BLOCK_M": 4, "BLOCK_K": 512})


def variants(sms: int, dtypes: tuple[str, ...], tokens: tuple[int, ...] = TOKENS,
             shapes: tuple[tuple[int, int], ...] = SHAPES) -> list[tuple[str, object, BlockConfig | None]]:
    """(name, ASTSource, config) of every distinct kernel the launchers would pick on the bench shapes."""
    import importlib

    jit = importlib.import_module("lowbit.kernels.triton.jit")
    out, seen = [], set()
    for dtype in dtypes:
        for k, n in shapes:
            for m in tokens:
                c4 = int4_config(m, n, k, 128, k // 128, sms)
                cn = int4_config(m, n, k, 64, k // 64, sms, lut=True)
                cg = int4_config(m, n, k, 128, k // 128, sms, gidx=True)
                c8 = w8a8_config(m, n, k, sms)
                cases = [
                    (f"w4a16 sym {dtype} {c4}", _4bit_source(jit, dtype, 0, False, False, c4, 128, k), c4),
                    (f"w4a16 asym+bias {dtype} {c4}", _4bit_source(jit, dtype, 1, False, True, c4, 128, k), c4),
                    (f"nf4 {dtype} {cn}", _4bit_source(jit, dtype, 2, False, False, cn, 64, k), cn),
                    (f"w4a16 act-order uneven {dtype} {cg}", _4bit_source(jit, dtype, 0, True, False, cg, 128, k),
                     cg),
                    (f"w8a8 fused={m <= 64} {dtype} {c8}", _w8a8_source(jit, dtype, m <= 64, True, c8), c8),
                ]
                for name, src, cfg in cases:
                    if name not in seen:
                        seen.add(name)
                        out.append((name, src, cfg))
        out.append((f"quantize_rows {dtype}", _quant_source(jit, dtype), None))
    return out


def compile_all(arch: int = 90, sms: int = 132, dtypes: tuple[str, ...] = ("bfloat16",),
                tokens: tuple[int, ...] = TOKENS, shapes: tuple[tuple[int, int], ...] = SHAPES) -> list[dict]:
    """Compile every variant for ``sm_<arch>``; one record per variant (name, PTX tensor-core ops, shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter builds no GPU code.")
    target = GPUTarget("cuda", arch, 32)
    records = []
    for name, src, cfg in variants(sms, dtypes, tokens, shapes):
        options = {} if cfg is None else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        kernel = triton.compile(src, target=target, options=options)
        ptx = kernel.asm["ptx"]
        records.append({"variant": name, "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx or "wgmma" in ptx,
                        "shared_bytes": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"])})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the configs assume (132: H100 SXM)")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: float16,bfloat16")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated M values")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="comma-separated KxN")
    args = parser.parse_args()
    tokens = tuple(int(m) for m in args.tokens.split(","))
    shapes = tuple((int(k), int(n)) for k, n in (s.split("x") for s in args.shapes.split(",")))
    records = compile_all(args.arch, args.sms, tuple(args.dtypes.split(",")), tokens, shapes)
    json.dump(records, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
