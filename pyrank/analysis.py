"""RLVR diagnostics (docs/METHODS.md §3, "The Path Not Taken", arXiv 2511.08567).

* :func:`update_sparsity`, :func:`changed_mask` — which weights an update left unchanged:
  |w_t − w_0| ≤ η·max(|w_t|, |w_0|) (η = 1e-3: for bf16 the same as bitwise equality).
* :func:`principal_angles` — between the top-k left (and right) singular subspaces of W₀
  and W_t (of the weights, not of ΔW), through pyrank's SVD.
* :func:`spectral_shift` — NSS = ‖σ(W_t) − σ(W₀)‖₂ / ‖σ(W₀)‖₂ over the top k.
* :func:`principal_weight_overlap` — overlap of the changed mask with the principal
  weights (top-α of |rank-k reconstruction of W₀|) and with the low-magnitude weights
  (bottom-α of |W₀|), each beside its random baseline α.
* :func:`mask_jaccard` — Jaccard index of two changed masks and its random baseline;
  :func:`update_jaccard` the same for the masks of two updates of one base, blockwise.
* :func:`diagnostics` — all of the above for one (W₀, W_t) pair, sharing the SVDs (what
  ``pyrank analyze --diagnostics`` reports per module and checkpoint).

Everything runs a block of rows at a time: no fp32 copy of a whole matrix, and the rank-k
reconstruction is never held whole (its top-α threshold is found by an exact two-pass
radix select on the fp32 bit patterns).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from . import ops
from .linalg import svd_lowrank

__all__ = ["update_sparsity", "changed_mask", "principal_angles", "spectral_shift",
           "principal_weight_overlap", "mask_jaccard", "update_jaccard", "diagnostics"]

_rows = ops.row_blocks


def _changed_block(W0, Wt, i, j, eta):
    cd = ops.compute_dtype(W0.dtype)
    a, b = W0[i:j].to(cd), Wt[i:j].to(cd)
    return (b - a).abs() > eta * torch.maximum(a.abs(), b.abs())


def changed_count(W0: Tensor, Wt: Tensor, eta: float = 1e-3) -> int:
    """Number of entries with |w_t − w_0| > η·max(|w_t|, |w_0|)."""
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    return sum(int(_changed_block(W0, Wt, i, j, eta).sum()) for i, j in _rows(*W0.shape))


def changed_mask(W0: Tensor, Wt: Tensor, eta: float = 1e-3) -> Tensor:
    """Boolean (m, n) mask of the changed entries (computed a block of rows at a time)."""
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    out = torch.empty(W0.shape, dtype=torch.bool, device=W0.device)
    for i, j in _rows(*W0.shape):
        out[i:j] = _changed_block(W0, Wt, i, j, eta)
    return out


# For bf16 (8 significant bits) two different numbers differ by at least 2⁻⁸ of the larger
# magnitude (the worst case: 2^e − 2^(e−8) and 2^e), so with η ≤ 2⁻⁹ — a margin for the fp32
# rounding of η·max — the η rule counts exactly the entries where W_t ≠ W₀, which the SVD's
# first read counts anyway (LowRankSVD.nnz). fp16 (11 bits) and fp32 changes can be smaller
# than η = 1e-3 of the weight: those need the rule's own pass. (Non-finite weights differ
# between the two, but the SVD refuses them.)
ETA_COUNT_MAX = 2.0 ** -9


def count_is_eta_rule(dtype, eta: float) -> bool:
    """Whether the changed count #{W_t ≠ W₀} equals the η rule's count for weights of
    ``dtype`` (a torch dtype or its name): bf16 and 0 ≤ η ≤ 2⁻⁹."""
    return str(dtype) == "torch.bfloat16" and 0.0 <= eta <= ETA_COUNT_MAX


def update_sparsity(W0: Tensor, Wt: Tensor, eta: float = 1e-3) -> float:
    """Fraction of unchanged weights: 1 − changed/total (docs/METHODS.md §3)."""
    total = W0.numel()
    return 1.0 - changed_count(W0, Wt, eta) / total if total else 1.0


def _svd(W, k, tol, backend, given=None):
    return given if given is not None else svd_lowrank(W, k, tol=tol, backend=backend)


def _angles(P, Q):
    c = torch.linalg.svdvals(P.double().cpu().T @ Q.double().cpu()).clamp(0.0, 1.0)
    return torch.arccos(c).sort().values


def _nss(s0, st):
    s0, st = s0.double().cpu(), st.double().cpu()
    den = float(s0.norm())
    return float((st - s0).norm()) / den if den > 0 else float("nan")


def principal_angles(W0: Tensor, Wt: Tensor, k: int, *, tol: float = 1e-6,
                     backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Principal angles (radians, ascending, float64) between the top-k left singular
    subspaces of W₀ and W_t, and between the right ones: θ_i = arccos σ_i(U₀ᵀ U_t)."""
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    r0, rt = _svd(W0, k, tol, backend), _svd(Wt, k, tol, backend)
    return _angles(r0.U, rt.U), _angles(r0.V, rt.V)


def spectral_shift(W0: Tensor, Wt: Tensor, k: int, *, tol: float = 1e-6, backend: str = "auto") -> float:
    """NSS = ‖σ_{1..k}(W_t) − σ_{1..k}(W₀)‖₂ / ‖σ_{1..k}(W₀)‖₂."""
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    return _nss(_svd(W0, k, tol, backend).S, _svd(Wt, k, tol, backend).S)


# ------------------------------------------------------------------ principal weights


def _abs_blocks(src, m, n):
    """Yield (i, j, |block| as fp32) for src: a tensor, or a function (i, j) -> block."""
    for i, j in _rows(m, n):
        blk = src(i, j) if callable(src) else src[i:j]
        yield i, j, blk.float().abs()


def _kth_threshold(src, m, n, count: int, largest: bool) -> float:
    """The ``count``-th largest (or smallest) value of |src| — exact, in two passes over
    blocks: a histogram of the top 16 bits of the fp32 patterns (monotonic for x ≥ 0)
    finds the bin that holds it, then that bin's values are sorted."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for _, _, a in _abs_blocks(src, m, n):
        hist += torch.bincount((a.view(torch.int32) >> 16).reshape(-1).cpu(), minlength=1 << 16)
    order = hist.flip(0) if largest else hist
    cum = order.cumsum(0)
    pos = int(torch.searchsorted(cum, torch.tensor(count)))
    bin_id = (len(hist) - 1 - pos) if largest else pos
    before = int(cum[pos - 1]) if pos > 0 else 0
    vals = []
    for _, _, a in _abs_blocks(src, m, n):
        sel = a[(a.view(torch.int32) >> 16) == bin_id]
        if sel.numel():
            vals.append(sel.cpu())
    v = torch.cat(vals).sort(descending=largest).values
    return float(v[count - before - 1])


def principal_weight_overlap(W0: Tensor, Wt: Tensor, k: int, alpha: float, eta: float = 1e-3,
                             *, tol: float = 1e-6, backend: str = "auto", base_svd=None) -> dict:
    """Overlap of the changed mask M with the principal and the low-magnitude weights.

    M_princ: the top-α fraction of entries by |W₀^(k)|, the rank-k SVD reconstruction of W₀;
    M_low: the bottom-α fraction by |W₀|. Overlap(M•, M) = |M• ∩ M| / |M|; the random
    baseline of both is α (their density). Ties at a threshold are all included.
    Returns {"princ", "low", "baseline", "changed_fraction"}. ``base_svd``: W₀'s top-k
    :class:`LowRankSVD`, if already computed.
    """
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    m, n = W0.shape
    res = _svd(W0, k, tol, backend, base_svd)
    US = (res.U * res.S).float()
    Vt = res.V.float().T

    def recon(i, j):  # a block of rows of W₀^(k), never the whole matrix
        return US[i:j] @ Vt

    count = max(1, int(math.ceil(alpha * m * n)))
    thr_p = _kth_threshold(recon, m, n, count, largest=True)
    thr_l = _kth_threshold(W0, m, n, count, largest=False)
    changed = inter_p = inter_l = 0
    for i, j in _rows(m, n):
        mask = _changed_block(W0, Wt, i, j, eta)
        changed += int(mask.sum())
        inter_p += int((mask & (recon(i, j).abs() >= thr_p)).sum())
        inter_l += int((mask & (W0[i:j].float().abs() <= thr_l)).sum())
    nan = float("nan")
    return {"princ": inter_p / changed if changed else nan, "low": inter_l / changed if changed else nan,
            "baseline": alpha, "changed_fraction": changed / (m * n)}


def mask_jaccard(mask_a: Tensor, mask_b: Tensor) -> Tuple[float, float]:
    """(J, random baseline pq/(p + q − pq)) for two boolean masks of densities p and q."""
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"masks differ in shape: {tuple(mask_a.shape)} vs {tuple(mask_b.shape)}")
    a, b = mask_a.bool(), mask_b.bool()
    return _jaccard(int((a & b).sum()), int((a | b).sum()), int(a.sum()), int(b.sum()), a.numel())


def _jaccard(inter: int, union: int, na: int, nb: int, total: int) -> Tuple[float, float]:
    """J = |a ∩ b| / |a ∪ b| and its random baseline pq/(p + q − pq) from the counts."""
    p, q = na / total, nb / total
    den = p + q - p * q
    return (inter / union if union else float("nan")), (p * q / den if den > 0 else float("nan"))


def update_jaccard(W0: Tensor, Wa: Tensor, Wb: Tensor, eta: float = 1e-3) -> Tuple[float, float]:
    """:func:`mask_jaccard` of the changed masks of Wa and Wb against the same W₀, a block of
    rows at a time (the masks are never held whole)."""
    ops.check_weights(Wa, W0, names=("Wa", "W0"))
    ops.check_weights(Wb, W0, names=("Wb", "W0"))
    inter = union = na = nb = 0
    for i, j in _rows(*W0.shape):
        a, b = _changed_block(W0, Wa, i, j, eta), _changed_block(W0, Wb, i, j, eta)
        inter += int((a & b).sum())
        union += int((a | b).sum())
        na += int(a.sum())
        nb += int(b.sum())
    return _jaccard(inter, union, na, nb, W0.numel())


def diagnostics(W0: Tensor, Wt: Tensor, k: int = 16, alpha: float = 0.05, eta: float = 1e-3, *,
                base_svd=None, tol: float = 1e-6, backend: str = "auto") -> dict:
    """Every §3 diagnostic of one (W₀, W_t) pair, with one top-k SVD of each weight.

    ``base_svd`` (W₀'s top-k :class:`LowRankSVD`) saves recomputing it across checkpoints.
    Returns {"angle_u_max", "angle_u_mean", "angle_v_max", "angle_v_mean"} (degrees),
    "nss", "overlap_princ", "overlap_low", "overlap_baseline", "changed_fraction".
    """
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    k = min(k, *W0.shape)
    r0 = _svd(W0, k, tol, backend, base_svd)
    rt = _svd(Wt, k, tol, backend)
    au, av = _angles(r0.U, rt.U).rad2deg(), _angles(r0.V, rt.V).rad2deg()
    ov = principal_weight_overlap(W0, Wt, k, alpha, eta, tol=tol, backend=backend, base_svd=r0)
    return {"angle_u_max": float(au.max()), "angle_u_mean": float(au.mean()),
            "angle_v_max": float(av.max()), "angle_v_mean": float(av.mean()),
            "nss": _nss(r0.S, rt.S), "overlap_princ": ov["princ"], "overlap_low": ov["low"],
            "overlap_baseline": ov["baseline"], "changed_fraction": ov["changed_fraction"]}
