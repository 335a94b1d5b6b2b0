"""(A − B)·X, (A − B)ᵀ·Y and ‖A − B‖_F² in one read of A and B, and the Gram matrix of
deltas, as Triton kernels.

Layout of this file: the products (configs → ``_delta_products_kernel`` → grid and host
launcher → ``delta_products``), then the Gram matrix (``_pair_dot_kernel`` for any layout,
the autotuned ``_gram_kernel`` for contiguous weights → ``delta_gram``).

One kernel serves all three products. The grid is a PM × PN array of programs; program
(pm, pn) owns a range of rows and a range of columns of A and walks it in BM × BN tiles.
Each tile of Δ = A − B is formed in fp32 registers (never stored) and feeds

* Δ·X: the program's partial sums over its columns, for its rows → part_x[pn] (BM × KX
  accumulators stay in registers across the column tiles of a row tile);
* Δᵀ·Y: partial sums over its rows, for its columns → part_y[pm] (read-modify-write of
  a slice only this program touches; the buffer is small and stays in L2).

The host sums the PN (resp. PM) partial buffers: a fixed reduction order, so results are
deterministic (no atomics). Products use ``tl.dot(..., input_precision="ieee")``: fp32
FMA, because tf32 would give away the accuracy the SVD's stopping test relies on.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BM, BN, num_warps). The memory-bound regime wants wide, coalesced column tiles.
_CONFIGS = [
    triton.Config({"BM": 64, "BN": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 128}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 32, "BN": 128}, num_warps=4, num_stages=4),
]
_INTERPRET_META = {"BM": 16, "BN": 16}  # the interpreter runs numpy per tile: keep tiles small

MAX_K = 128  # columns of X / Y per launch; wider operands are split into launches


@triton.jit
def _delta_products_kernel(
    p_a, p_b, p_x, p_y, p_px, p_py, p_sq, p_nz,
    m, n, kx, ky, PM, PN,
    s_am, s_an, s_bm, s_bn, s_xn, s_xk, s_ym, s_yk,
    HAS_B: tl.constexpr, HAS_X: tl.constexpr, HAS_Y: tl.constexpr, SQNORM: tl.constexpr,
    KX: tl.constexpr, KY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows_per = tl.cdiv(tl.cdiv(m, PM), BM) * BM
    cols_per = tl.cdiv(tl.cdiv(n, PN), BN) * BN
    r_lo = pm * rows_per
    r_hi = tl.minimum(m, r_lo + rows_per)
    c_lo = pn * cols_per
    c_hi = tl.minimum(n, c_lo + cols_per)
    o_kx = tl.arange(0, KX)
    o_ky = tl.arange(0, KY)
    if SQNORM:
        b_sq = tl.zeros((BM,), dtype=tl.float32)
        b_nz = tl.zeros((BM,), dtype=tl.int32)  # nonzero Δ entries per row (< 2³¹: one row's)
    for i0 in range(r_lo, r_hi, BM):
        o_m = i0 + tl.arange(0, BM)
        mask_m = o_m < r_hi
        if HAS_X:
            b_ax = tl.zeros((BM, KX), dtype=tl.float32)
        if HAS_Y:
            b_y = tl.load(p_y + o_m[:, None] * s_ym + o_ky[None, :] * s_yk,
                          mask=mask_m[:, None] & (o_ky[None, :] < ky), other=0.0)
        for j0 in range(c_lo, c_hi, BN):
            o_n = j0 + tl.arange(0, BN)
            mask_n = o_n < c_hi
            mask = mask_m[:, None] & mask_n[None, :]
            b_d = tl.load(p_a + o_m[:, None] * s_am + o_n[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                b_d -= tl.load(p_b + o_m[:, None] * s_bm + o_n[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
            if SQNORM:
                b_sq += tl.sum(b_d * b_d, axis=1)
                b_nz += tl.sum((b_d != 0.0).to(tl.int32), axis=1)  # masked entries load as 0
            if HAS_X:
                b_x = tl.load(p_x + o_n[:, None] * s_xn + o_kx[None, :] * s_xk,
                              mask=mask_n[:, None] & (o_kx[None, :] < kx), other=0.0)
                b_ax += tl.dot(b_d, b_x, input_precision="ieee")
            if HAS_Y:
                p_out = p_py + pm * n * KY + o_n[:, None] * KY + o_ky[None, :]
                part = tl.load(p_out, mask=mask_n[:, None], other=0.0)
                part += tl.dot(tl.trans(b_d), b_y, input_precision="ieee")
                tl.store(p_out, part, mask=mask_n[:, None])
        if HAS_X:
            tl.store(p_px + pn * m * KX + o_m[:, None] * KX + o_kx[None, :], b_ax, mask=mask_m[:, None])
    if SQNORM:
        tl.store(p_sq + pm * PN + pn, tl.sum(b_sq, axis=0))
        tl.store(p_nz + pm * PN + pn, tl.sum(b_nz.to(tl.int64), axis=0))


if not INTERPRET:
    _delta_products_kernel = triton.autotune(
        configs=_CONFIGS, key=["m", "n", "KX", "KY", "HAS_X", "HAS_Y"],
        reset_to_zero=["p_py"],  # part_y accumulates: every autotune trial starts from zero
    )(_delta_products_kernel)


def _grid_split(m: int, n: int, has_x: bool, has_y: bool, device: torch.device):
    """(PM, PN): enough programs to fill the device, partial buffers kept small."""
    if INTERPRET or device.type != "cuda":
        target = 4
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    bm, bn = 64, 64  # planning granularity; the kernel rounds ranges to its own tiles
    tiles_m, tiles_n = triton.cdiv(m, bm), triton.cdiv(n, bn)
    if has_x and not has_y:  # one program per row range, all columns: no partials over columns
        return min(tiles_m, target), 1
    if has_y and not has_x:
        return 1, min(tiles_n, target)
    pm = max(1, min(tiles_m, int(round((target * m / max(n, 1)) ** 0.5))))
    pn = max(1, min(tiles_n, target // pm))
    return pm, pn


def _delta_products_launch(A, B, X, Y, sqnorm):
    m, n = A.shape
    dev = A.device
    has_x, has_y = X is not None, Y is not None
    kx = X.shape[1] if has_x else 0
    ky = Y.shape[1] if has_y else 0
    KX = max(16, triton.next_power_of_2(kx)) if has_x else 16
    KY = max(16, triton.next_power_of_2(ky)) if has_y else 16
    PM, PN = _grid_split(m, n, has_x, has_y, dev)
    part_x = torch.empty(PN, m, KX, dtype=torch.float32, device=dev) if has_x else None
    part_y = torch.zeros(PM, n, KY, dtype=torch.float32, device=dev) if has_y else None
    part_sq = torch.zeros(PM * PN, dtype=torch.float32, device=dev) if sqnorm else None
    part_nz = torch.zeros(PM * PN, dtype=torch.int64, device=dev) if sqnorm else None
    dummy = A  # any valid pointer for operands the constexpr flags switch off
    Bp = B if B is not None else dummy
    Xp = X if has_x else dummy
    Yp = Y if has_y else dummy
    meta = dict(_INTERPRET_META) if INTERPRET else {}
    _delta_products_kernel[(PM, PN)](
        A, Bp, Xp, Yp, part_x if has_x else dummy, part_y if has_y else dummy,
        part_sq if sqnorm else dummy, part_nz if sqnorm else dummy, m, n, kx, ky, PM, PN,
        A.stride(0), A.stride(1), Bp.stride(0), Bp.stride(1),
        Xp.stride(0), Xp.stride(1), Yp.stride(0), Yp.stride(1),
        HAS_B=B is not None, HAS_X=has_x, HAS_Y=has_y, SQNORM=bool(sqnorm), KX=KX, KY=KY, **meta,
    )
    out_x = part_x.sum(0)[:, :kx] if has_x else None
    out_y = part_y.sum(0)[:, :ky] if has_y else None
    sq = part_sq.double().sum().float() if sqnorm else None
    nz = int(part_nz.sum()) if sqnorm else None
    return out_x, out_y, sq, nz


def delta_products(A: torch.Tensor, B, X, Y, sqnorm: bool = False):
    """((A − B)·X, (A − B)ᵀ·Y, ‖A − B‖_F², #{A − B ≠ 0}) in one read of A and B; X, Y may be
    None and the norm and count are computed only when asked (else None).

    A, B: (m, n) bf16/fp16/fp32 on one CUDA device (B may be None), any strides.
    X: (n, kx) fp32; Y: (m, ky) fp32. Returns fp32 (m, kx), (n, ky), a 0-d tensor and an int.
    Operands wider than MAX_K columns are processed MAX_K columns per launch (the norm and
    count come from the first).
    """
    kx = X.shape[1] if X is not None else 0
    ky = Y.shape[1] if Y is not None else 0
    if max(kx, ky) <= MAX_K:
        out_x, out_y, sq, nz = _delta_products_launch(A, B, X, Y, sqnorm)
    else:
        xs, ys, sq, nz = [], [], None, None
        for c in range(0, max(kx, ky), MAX_K):
            xc = X[:, c:c + MAX_K] if X is not None and c < kx else None
            yc = Y[:, c:c + MAX_K] if Y is not None and c < ky else None
            ox, oy, s, z = _delta_products_launch(A, B, xc, yc, sqnorm and c == 0)
            sq, nz = (s, z) if c == 0 else (sq, nz)
            if ox is not None:
                xs.append(ox)
            if oy is not None:
                ys.append(oy)
        out_x = torch.cat(xs, 1) if X is not None else None
        out_y = torch.cat(ys, 1) if Y is not None else None
    return (None if out_x is None else out_x.contiguous(),
            None if out_y is None else out_y.contiguous(), sq, nz)


@triton.jit
def _pair_dot_kernel(p_a, p_c, p_b, p_out, m, n, s_am, s_an, s_cm, s_cn, s_bm, s_bn,
                     HAS_B: tl.constexpr, SAME: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Per-row ⟨A − B, C − B⟩; SAME: C is A (‖A − B‖², read once)."""
    pid = tl.program_id(0)
    o_m = pid * BM + tl.arange(0, BM)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for j0 in range(0, n, BN):
        o_n = j0 + tl.arange(0, BN)
        mask = (o_m[:, None] < m) & (o_n[None, :] < n)
        da = tl.load(p_a + o_m[:, None] * s_am + o_n[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            da -= tl.load(p_b + o_m[:, None] * s_bm + o_n[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
        if SAME:
            dc = da
        else:
            dc = tl.load(p_c + o_m[:, None] * s_cm + o_n[None, :] * s_cn, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                dc -= tl.load(p_b + o_m[:, None] * s_bm + o_n[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(da * dc, axis=1)
    tl.store(p_out + o_m, acc, mask=o_m < m)


def _pair_dot(A, C, B) -> torch.Tensor:
    """⟨A − B, C − B⟩ as a float64 0-d tensor: per-row fp32 sums, one float64 sum over rows."""
    m, n = A.shape
    rows = torch.empty(m, dtype=torch.float32, device=A.device)
    Bp = B if B is not None else A
    BM, BN = (16, 16) if INTERPRET else (8, 512)
    _pair_dot_kernel[(triton.cdiv(m, BM),)](A, C, Bp, rows, m, n, A.stride(0), A.stride(1),
                                            C.stride(0), C.stride(1), Bp.stride(0), Bp.stride(1),
                                            HAS_B=B is not None, SAME=C is A, BM=BM, BN=BN)
    return rows.double().sum()


@triton.jit
def _gram_kernel(p_rows, p_cols, p_b, p_part, N, TR, TC, HAS_B: tl.constexpr, SAME: tl.constexpr,
                 TB: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr):
    """Partial Gram block: part[pid] = Σ over this program's element chunks of D_r·D_cᵀ, where
    row t of D_r is the flattened A_t − B of the weight whose address is p_rows[t] (D_c: p_cols).
    Every weight is read once per block; SAME (p_cols is p_rows) reads it once in all."""
    pid = tl.program_id(0)
    npg = tl.num_programs(0)
    t = tl.arange(0, TB)
    rows = tl.load(p_rows + t, mask=t < TR, other=0).to(tl.pointer_type(DTYPE))
    cols = tl.load(p_cols + t, mask=t < TC, other=0).to(tl.pointer_type(DTYPE))
    acc = tl.zeros((TB, TB), dtype=tl.float32)
    for k0 in range(pid * BK, N, npg * BK):
        o = k0 + tl.arange(0, BK)
        in_n = o[None, :] < N
        dr = tl.load(rows[:, None] + o[None, :], mask=(t[:, None] < TR) & in_n, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(p_b + o, mask=o < N, other=0.0).to(tl.float32)[None, :]
            dr = tl.where((t[:, None] < TR) & in_n, dr - b, 0.0)
        if SAME:
            dc = dr
        else:
            dc = tl.load(cols[:, None] + o[None, :], mask=(t[:, None] < TC) & in_n, other=0.0).to(tl.float32)
            if HAS_B:
                dc = tl.where((t[:, None] < TC) & in_n, dc - b, 0.0)
        acc += tl.dot(dr, tl.trans(dc), input_precision="ieee")
    tl.store(p_part + pid * TB * TB + t[:, None] * TB + t[None, :], acc)


if not INTERPRET:  # the element chunk per iteration and the warps; the grid does not depend on them
    _gram_kernel = triton.autotune(
        configs=[triton.Config({"BK": 128}, num_warps=4), triton.Config({"BK": 256}, num_warps=4),
                 triton.Config({"BK": 512}, num_warps=8)],
        key=["N", "TR", "TC", "HAS_B", "SAME"],
    )(_gram_kernel)

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_GRAM_TB = 16  # checkpoints per Gram block: tl.dot's smallest tile


def _gram_fused(As, B) -> torch.Tensor:
    """The T×T Gram matrix of contiguous weights, one read of every weight per block pair of
    16 checkpoints (T ≤ 16: one read in all). Per-program fp32 partials, summed in float64
    on the host in a fixed order (deterministic)."""
    T, dev = len(As), As[0].device
    N = As[0].numel()
    table = torch.tensor([a.data_ptr() for a in As], dtype=torch.int64, device=dev)
    P = 2 if INTERPRET else max(1, min(4 * _sm_count(dev), triton.cdiv(N, 512)))
    meta = {"BK": 64} if INTERPRET else {}  # autotuned on a GPU
    TB = _GRAM_TB
    G = torch.zeros(T, T, dtype=torch.float64, device=dev)
    Bp = B if B is not None else As[0]
    for i0 in range(0, T, TB):
        for j0 in range(i0, T, TB):
            ti, tj = min(TB, T - i0), min(TB, T - j0)
            part = torch.empty(P, TB, TB, dtype=torch.float32, device=dev)
            _gram_kernel[(P,)](table[i0:], table[j0:], Bp, part, N, ti, tj, HAS_B=B is not None,
                               SAME=i0 == j0, TB=TB, DTYPE=_TL_DTYPE[As[0].dtype], **meta)
            G[i0:i0 + ti, j0:j0 + tj] = part.double().sum(0)[:ti, :tj]
    return G  # the upper block triangle: ops.delta_gram mirrors it


def _sm_count(dev) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1


def delta_gram(As, B) -> torch.Tensor:
    """G[i, j] = ⟨As[i] − B, As[j] − B⟩ (float64, T×T).

    Contiguous weights (the usual case: checkpoints loaded from files): one fused kernel
    that reads each weight once per pair of 16-checkpoint blocks. Other layouts: one launch
    per pair i ≤ j, each reading A_i, A_j and B — T(T+1)/2 × 3 reads.
    """
    if all(a.is_contiguous() for a in As) and (B is None or B.is_contiguous()):
        return _gram_fused(As, B)
    T = len(As)
    G = torch.zeros(T, T, dtype=torch.float64, device=As[0].device)
    for i in range(T):
        for j in range(i, T):
            G[i, j] = G[j, i] = _pair_dot(As[i], As[j], B)
    return G
