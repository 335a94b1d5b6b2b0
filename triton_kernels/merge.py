"""W + U·diag(αS)·Vᵀ as a Triton kernel: fp32 math, one rounding to W's dtype.

Layout of this file: configs → kernel → host launcher (public function).

Each program writes one BM × BN tile: it reads the tile of W once, adds
(α·U·S)[rows]·Vᵀ[:, cols] computed with fp32 FMA (``input_precision="ieee"``), and
stores the sum converted to W's dtype with round-to-nearest-even. In place (out is W)
is safe: every element is read and written by the same program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .delta import INTERPRET

_CONFIGS = [
    triton.Config({"BM": 64, "BN": 128}, num_warps=4, num_stages=2),
    triton.Config({"BM": 128, "BN": 128}, num_warps=8, num_stages=2),
    triton.Config({"BM": 32, "BN": 256}, num_warps=4, num_stages=2),
]


@triton.jit
def _merge_kernel(p_w, p_out, p_us, p_v, m, n, k,
                  s_wm, s_wn, s_om, s_on, s_um, s_uk, s_vn, s_vk,
                  K: tl.constexpr, BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    o_k = tl.arange(0, K)
    mask = (o_m[:, None] < m) & (o_n[None, :] < n)
    b_u = tl.load(p_us + o_m[:, None] * s_um + o_k[None, :] * s_uk,
                  mask=(o_m[:, None] < m) & (o_k[None, :] < k), other=0.0)
    b_vt = tl.load(p_v + o_n[None, :] * s_vn + o_k[:, None] * s_vk,
                   mask=(o_n[None, :] < n) & (o_k[:, None] < k), other=0.0)
    b_lr = tl.dot(b_u, b_vt, input_precision="ieee")  # the low-rank term, then W: as the reference
    b_w = tl.load(p_w + o_m[:, None] * s_wm + o_n[None, :] * s_wn, mask=mask, other=0.0).to(tl.float32)
    b_o = b_w + b_lr
    if BF16:
        # Round to nearest even on the bits, as torch does (NaN -> 0x7fc0). Explicit because
        # Triton's interpreter truncates fp32 -> bf16 whatever the rounding mode says, and
        # the tests must check the conversion the GPU runs. p_out is the int16 view of out.
        bits = b_o.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(b_o != b_o, 0x7FC0, bits)
        b_store = bits.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        b_store = b_o.to(p_out.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(p_out + o_m[:, None] * s_om + o_n[None, :] * s_on, b_store, mask=mask)


if not INTERPRET:
    _merge_kernel = triton.autotune(configs=_CONFIGS, key=["m", "n", "K"],
                                    restore_value=["p_out"])(_merge_kernel)

MAX_K = 64  # rank per launch: the U tile is BM × K fp32 registers. One rounding needs one pass,
# so pyrank's dispatcher merges wider updates with the torch reference instead.


def merge_lowrank(W: torch.Tensor, US: torch.Tensor, V: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = round(W + US·Vᵀ).  W, out: (m, n) same dtype (out may be W); US: (m, k) fp32
    (α·U·diag(S) already folded in); V: (n, k) fp32. k ≤ MAX_K (one rounding needs one pass)."""
    m, n = W.shape
    k = US.shape[1]
    if k > MAX_K:
        raise ValueError(f"the Triton merge takes rank ≤ {MAX_K} per call, got {k}")
    K = max(16, triton.next_power_of_2(k))
    meta = {"BM": 16, "BN": 16} if INTERPRET else {}

    def grid(META):
        return (triton.cdiv(m, META["BM"]), triton.cdiv(n, META["BN"]))

    bf16 = out.dtype == torch.bfloat16
    dst = out.view(torch.int16) if bf16 else out
    _merge_kernel[grid](W, dst, US, V, m, n, k, W.stride(0), W.stride(1), out.stride(0), out.stride(1),
                        US.stride(0), US.stride(1), V.stride(0), V.stride(1), K=K, BF16=bf16, **meta)
    return out
