"""Compile every Triton kernel for NVIDIA targets without a GPU (run by test_triton_compile.py
with TRITON_INTERPRET unset): Triton lowers to PTX and its bundled ptxas to a cubin, which
catches what the interpreter cannot — unsupported ops, layouts, register/shared-memory
limits — for the data types and tile configs the launchers use."""
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyrank.triton_kernels import delta, merge


def jit_fn(k):
    return k.fn if hasattr(k, "configs") else k  # unwrap the autotuner


def configs(k, default):
    return [dict(c.kwargs, num_warps=c.num_warps) for c in k.configs] if hasattr(k, "configs") else [default]


def compile_one(kernel, sig, consts, target, num_warps):
    src = ASTSource(fn=jit_fn(kernel), signature={**sig, **{c: "constexpr" for c in consts}}, constexprs=consts)
    out = triton.compile(src, target=target, options={"num_warps": num_warps})
    assert out.asm.get("cubin"), "no cubin"


def main(arch: int):
    """Every autotune config of every kernel in bf16 (the dtype that matters), with the
    heaviest constexpr combinations (KX = KY = 128, the launchers' MAX_K); fp16 and fp32 with
    one config each."""
    target = GPUTarget("cuda", arch, 32)
    t0, n = time.time(), 0
    for dt, tdt in (("bf16", tl.bfloat16), ("fp16", tl.float16), ("fp32", tl.float32)):
        full = dt == "bf16"
        p = "*" + dt
        sig = dict(p_a=p, p_b=p, p_x="*fp32", p_y="*fp32", p_px="*fp32", p_py="*fp32", p_sq="*fp32", p_nz="*i64",
                   m="i32", n="i32", kx="i32", ky="i32", PM="i32", PN="i32", s_am="i32", s_an="i32", s_bm="i32",
                   s_bn="i32", s_xn="i32", s_xk="i32", s_ym="i32", s_yk="i32")
        for i, cfg in enumerate(configs(delta._delta_products_kernel, {"BM": 64, "BN": 64, "num_warps": 4})):
            if i and not full:
                break
            warps = cfg.pop("num_warps")
            modes = [(True, True, 16), (True, True, 128)] if full else [(True, True, 16)]
            if full and i == 0:
                modes += [(True, False, 128), (False, True, 128)]
            for has_x, has_y, k in modes:
                consts = dict(HAS_B=True, HAS_X=has_x, HAS_Y=has_y, SQNORM=True, KX=k, KY=k, **cfg)
                compile_one(delta._delta_products_kernel, sig, consts, target, warps)
                n += 1
        sig = dict(p_rows="*i64", p_cols="*i64", p_b=p, p_part="*fp32", N="i32", TR="i32", TC="i32")
        for i, cfg in enumerate(configs(delta._gram_kernel, {"BK": 256, "num_warps": 4})):
            if i and not full:
                break
            warps = cfg.pop("num_warps")
            for same in ((True, False) if full else (True,)):
                compile_one(delta._gram_kernel, sig, dict(HAS_B=True, SAME=same, TB=16, DTYPE=tdt, **cfg),
                            target, warps)
                n += 1
        if full:
            sig = dict(p_a=p, p_c=p, p_b=p, p_out="*fp32", m="i32", n="i32", s_am="i32", s_an="i32", s_cm="i32",
                       s_cn="i32", s_bm="i32", s_bn="i32")
            compile_one(delta._pair_dot_kernel, sig, dict(HAS_B=True, SAME=False, BM=8, BN=512), target, 4)
            n += 1
        sig = dict(p_w=p, p_out=p, p_us="*fp32", p_v="*fp32", m="i32", n="i32", k="i32", s_wm="i32", s_wn="i32",
                   s_om="i32", s_on="i32", s_um="i32", s_uk="i32", s_vn="i32", s_vk="i32")
        for i, cfg in enumerate(configs(merge._merge_kernel, {"BM": 64, "BN": 64, "num_warps": 4})):
            if i and not full:
                break
            warps = cfg.pop("num_warps")
            compile_one(merge._merge_kernel, sig, dict(K=64, BF16=dt == "bf16", **cfg), target, warps)
            n += 1
    print(f"sm_{arch}: {n} kernel variants compiled to cubin in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]))
