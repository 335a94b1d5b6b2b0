"""Randomized top-k SVD of A − base, written once above the backends.

Method: block Krylov with a two-sided Rayleigh–Ritz step (a block Lanczos
bidiagonalization with thick restarts).

The solver keeps an orthonormal left basis U together with ZU = Δᵀ·U, and an
orthonormal right basis V together with YV = Δ·V (Δ = A − base, never formed).
Each *pass* is one read of A and base through :mod:`pyrank.ops` and multiplies only
the newest block of directions: Δ·(new V) and/or Δᵀ·(new U), both in one fused read
when both sides have new directions (always, after a warm start). Because every
basis column's product is stored:

* the Rayleigh–Ritz matrix C = Uᵀ·Δ·V = Uᵀ·YV costs no pass (and is extended by the
  new blocks' rows and columns, not recomputed);
* both residuals of every Ritz triplet, ‖Δ·v_i − σ_i·u_i‖ = ‖YV·q_i − σ_i·U·p_i‖ and
  ‖Δᵀ·u_i − σ_i·v_i‖ = ‖ZU·p_i − σ_i·V·q_i‖, are exact a-posteriori values from
  products already made: the stopping test needs no extra pass. Each pass estimates
  them from the newest block alone (the Lanczos residual, l×l work); a stop is
  confirmed, and the returned residuals computed, from the full expressions;
* a restart rotates the stored products with the Ritz rotation instead of
  recomputing them.

Once all but a few of the top-k triplets are accepted — typically the noise bulk by the
cluster rule, while a few separated triplets still converge to ``tol`` — the newest block
is no longer what is left to do: the *narrow expansion* then extends both bases by the exact
residual vectors of the unaccepted triplets only (plus NARROW_EXTRA Ritz triplets below the
k-th), at most NARROW_MAX columns a side, both multiplied in one fused read: a read of a few
columns costs its bytes, where the full block's is compute-bound (top-64 of 4096×11008:
72 columns a pass, ~4× the time of a narrow one). It is a restricted Krylov (Davidson-type)
expansion: dropped directions come back through later residuals, which are computed from
all stored products, and these exact residuals replace the newest-block estimate.

New directions are the parts of the newest products orthogonal to the bases,
orthonormalized in fp32 (fp64 for fp64 weights) after every product — block
Gram–Schmidt twice (a third time for the few directions far weaker than the block's
strongest), then Householder QR with a rank-revealing SVD of R (for wide float32
blocks the same from Gram matrices: _orth_gram), which also drops directions the operator
has exhausted (rank-deficient or zero Δ). Entering the narrow expansion with a large basis,
the solver restarts it to the top-l Ritz vectors first (NARROW_RESTART).

Why Krylov, and what else was tried (chained passes, subspace iteration), with the
measurements: docs/DESIGN.md.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch import _lowrank as _torch_lowrank

from . import ops

__all__ = ["LowRankSVD", "svd_lowrank", "torch_svd_lowrank", "default_oversample"]


@dataclass
class LowRankSVD:
    """Top-k singular triplets of A − base.

    U: (m, k), S: (k,) descending, V: (n, k) — float32, or float64 for float64 weights.
    passes: reads of A and base (a fused two-sided read counts once).
    residual: (k,) max(‖Δv_i − σ_i u_i‖, ‖Δᵀu_i − σ_i v_i‖) / σ_1 per triplet.
    converged: every residual ≤ tol (every triplet certified).
    certified: (k,) bool, residual ≤ tol: the triplet, vectors included, is accurate to tol.
        A triplet that is not certified was accepted inside a cluster (see ``cluster_tol``):
        its σ is within residual·σ_1 of a singular value of Δ, its vectors are any unit
        vectors of the cluster's span at that accuracy.
    fro: ‖A − base‖_F when asked for (``fro=True``: read in the first pass), else None.
    nnz: with ``fro=True``, the number of entries where A ≠ base (as numbers, in the compute
        dtype: ±0 are equal), counted in the same pass; else None.
    Signs: the largest-magnitude entry of every u_i is positive.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    passes: int
    residual: Tensor
    converged: bool
    fro: Optional[float] = None
    nnz: Optional[int] = None
    certified: Optional[Tensor] = None
    # The Ritz bases a warm start from this result reuses (top-k plus near-degenerate ones).
    basis: Optional[Tuple[Tensor, Tensor]] = field(default=None, repr=False)

    def __iter__(self):  # allows ``U, S, V = pyrank.svd_lowrank(...)``
        return iter((self.U, self.S, self.V))


# The basis a result hands to a warm start: its top-k Ritz vectors, plus those of the
# oversampled ones whose σ is ≥ WARM_GAP·σ_k — close enough to swap places with a wanted
# triplet by the next checkpoint. Weaker ones are left out: the warm block is the basis plus
# one random column, and every column costs compute on every pass. Measured (k = 1, 4096×11008
# bf16 RL-like series, C++ backend, 2 cores, median warm step, carrying all k + 2 vs this):
# σ₂/σ₁ = 0.35 32.9 → 24.3 ms (1e-3 rad drift per checkpoint) and 46.1 → 35.5 ms (3e-2 rad);
# σ₂/σ₁ = 0.6 44.7 → 41.7 ms; 0.9 unchanged (all carried); the same passes in all four.
# Carrying only the top-k instead cost 5–7 passes instead of 2 where σ₁ and σ₂ cross.
WARM_GAP = 0.5


# A triplet inside a cluster of Ritz values (gap to a neighbour ≤ its residual) is accepted
# at this residual (see svd_lowrank's cluster_tol). Measured on a 4096×11008 RL-like bf16
# update, k = 8 (σ_k/σ_k+1 = 1.00, the noise bulk), C++ backend, 2 cores: converging every
# triplet to 1e-4 took 40 passes (0.70 s) for a top-8 subspace still 5° off, against
# torch.svd_lowrank(q=13, niter=2) 0.52 s at σ error 6.9e-3·σ₁ and 87° (its subspace is as
# undetermined as any); 1e-2 stops after 7–8 passes (0.14 s) with σ error 2.4e-3·σ₁.
# With the narrow expansion the bulk is no longer refined while the separated triplets
# finish, so this sets the bulk's accuracy: at k = 64 (cold, medians of 3, σ error/σ₁ and
# RMS principal angle of the top-64 left subspace) 1e-2 gave 0.58–0.69 s, 5.1e-3, 61°;
# 8e-3 0.55 s, 3.9e-3, 55°; 7e-3 0.62 s, 2.5e-3, 52°; 5e-3 0.93 s, 1.4e-3, 43° — against
# torch.svd_lowrank(q=69, niter=2) 0.66–0.71 s, 4.3e-3, 56°. 7e-3 is the loosest value
# that stays clearly more accurate than that baseline at k = 8–64.
CLUSTER_TOL = 7e-3


# A warm start multiplies both sides of its block in one fused read — while the block is at
# most this wide. Wider, the products are compute-bound (kernels: from ~8 columns a side), a
# fused pass costs about two one-sided ones, and every later pass stays two-sided; so a wide
# warm block starts one-sided, like a cold start, from the warm subspace. Measured
# (4096×11008 RL-like bf16, next checkpoint, C++ backend, 2 cores, fused → one-sided):
# k = 8 0.125 → 0.096 s (4 → 5 passes), k = 32 0.338 → 0.242 s (4 → 5), k = 64 2.11 →
# 0.93 s (12 → 12), σ and subspace errors equal or smaller.
FUSED_WARM_MAX = 8


# The narrow expansion (module docstring) starts once the unaccepted top-k triplets plus
# NARROW_EXTRA fit in min(NARROW_MAX, block/2) columns: a fused two-sided read of ≤ 8 columns
# a side costs about its bytes (FUSED_WARM_MAX), and below half the block it saves compute
# (k = 1's block of 3 never narrows). Measured (4096×11008 RL-like bf16, C++ backend, 2
# cores, medians of 5, cluster_tol 1e-2, full block → narrow): k = 64 cold 0.93 → 0.59 s
# (12 → 13 passes), warm 1.11 → 0.24 s (12 → 5); k = 32 cold 0.59 → 0.35 s, warm 0.21 →
# 0.15 s; k = 8 cold 0.27 → 0.27 s, warm 0.10 → 0.08 s; k = 1 unchanged. NARROW_EXTRA = 0, 2
# and 4 took the same passes; 2 keeps the k-th triplet's lower neighbours in view.
NARROW_MAX = FUSED_WARM_MAX
NARROW_EXTRA = 2

# Entering the narrow expansion with bases of more than NARROW_RESTART·l columns a side, the
# solver first restarts them to the top-l Ritz vectors (a thick restart): a narrow pass reads
# a few columns of A − B, but its Rayleigh–Ritz step and residuals cost O(basis size), which
# after the full-block passes is several blocks. It costs Krylov information the kept triplets
# converge from: one more pass in the cases measured. Measured (4096×11008 RL-like bf16, cold,
# C++ backend, Intel VM, 2 cores, interleaved pairs): k = 64 0.50 → 0.46 s (12 → 13 passes),
# k = 32 0.34 → 0.31–0.32 s (13 → 14), σ errors and subspace angles unchanged or smaller.
NARROW_RESTART = 2


def default_oversample(k: int) -> int:
    """Extra basis columns beyond k.

    Measured on a 4096×11008 RL-like bf16 update (pyrank.testing.rl_like_pair) with the
    C++ backend on a 2-core CPU: for k = 1 the pass count (6) did not drop for any
    oversample from 1 to 6 while each column costs compute, so 2; for k = 8 and 32, 4–8
    extra columns saved passes in the noise bulk (45 → 40 and 49 → 39). A warm start
    carries only the oversampled directions that are near the wanted ones (WARM_GAP)."""
    return min(max(2, k // 2), 8)


# ------------------------------------------------------------------ helpers


# A kept direction with s_i < REORTH_RATIO·s₀ gets a third Gram–Schmidt sweep (see
# _orth_against): after two it is within ~0.7·eps·s₀/s_i ≤ 70·eps of orthogonal above the
# ratio. On 4096×11008 RL-like updates almost no direction is that weak (min s_i/s₀: 5e-3
# at k = 8, 1e-2 at k = 32), so the sweep costs nothing there.
REORTH_RATIO = 1e-2


def _orth_against(basis: Optional[Tensor], W: Tensor, drop: float, limit: int,
                  coef: Optional[Tensor] = None, sweeps: int = 2) -> Tuple[Tensor, Tensor]:
    """Orthonormal directions Q of W orthogonal to ``basis`` (at most ``limit``), and E
    with (I − basis·basisᵀ)·W ≈ Q·E.

    Block Gram–Schmidt twice ("twice is enough"), then Householder QR and an SVD of
    the small R (:func:`_orth_gram` instead for float32 blocks of ≥ GRAM_ORTH_MIN
    columns): directions whose norm falls below ``drop`` are numerically in the span
    already (or in Δ's null space) and are discarded (they are W's part that Q·E leaves
    out). ``coef``: basisᵀ·W if the caller has it already, for the first sweep.
    ``sweeps=1`` for a W already orthogonal to the basis but for rounding (the first sweep
    then leaves it within ~eps of orthogonal: its rounding is relative to ‖W‖, which is
    its orthogonal part's norm).

    Twice is enough per block, not per direction: a kept direction whose singular value
    s_i is far below the block's largest, s₀, is only ~eps·s₀/s_i orthogonal to the
    basis (measured ≤ 0.7·eps·s₀/s_i; 2.6e-4 in float32 for a fp16 rank-deficient Δ with
    s_i = 8e-5·s₀, where the test suite caught it). Directions with s_i < REORTH_RATIO·s₀
    get a third sweep of their own; E is unchanged by it to rounding (s_i times a
    rotation of size eps·s₀/s_i).
    """
    if W.shape[1] == 0 or limit <= 0:
        return W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
    has_basis = basis is not None and basis.shape[1] > 0
    if has_basis:
        W = W - basis @ (basis.T @ W if coef is None else coef)
        if sweeps > 1:
            W = W - basis @ (basis.T @ W)
    cap = min(limit, W.shape[0] - (basis.shape[1] if has_basis else 0))
    got = _orth_gram(W, drop, cap) if W.dtype == torch.float32 and W.shape[1] >= GRAM_ORTH_MIN else None
    if got is not None:
        Q, E, s = got
        keep = Q.shape[1]
    else:
        Q, R = torch.linalg.qr(W)
        Ur, s, Vh = torch.linalg.svd(R)
        keep = min(int((s > drop).sum()), cap)
        Q, E = Q @ Ur[:, :keep], s[:keep, None] * Vh[:keep]
    if has_basis and keep:
        # directions that may be more than ~100·eps from orthogonal to the basis
        weak = int((s[:keep] < REORTH_RATIO * s[0]).sum())
        if weak:
            strong, Qw = Q[:, :keep - weak], Q[:, keep - weak:]
            Qw = Qw - basis @ (basis.T @ Qw)
            Qw = Qw - strong @ (strong.T @ Qw)  # (a zero update when every direction is weak)
            Qn, Rn = torch.linalg.qr(Qw)  # R ≈ diag(±1): undo Householder's sign flips
            Q = torch.cat([strong, Qn * torch.sgn(torch.diagonal(Rn))], 1)
    return Q, E


# Blocks at least this wide are orthonormalized from Gram matrices (_orth_gram) in float32
# solves; narrower ones by Householder QR, whose cost there is mostly per call.
GRAM_ORTH_MIN = 16


def _orth_gram(W: Tensor, drop: float, cap: int) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """_orth_against's QR step for a wide float32 block, from Gram matrices: (Q, E, s) with
    W ≈ Q·E, Q orthonormal, s W's singular values (descending); or None where the second
    step finds the first too far from orthonormal (then Householder QR, as for narrow blocks).

    First SVQB: the Gram matrix WᵀW summed in float64 (its eigenvalues resolve s down to
    ~1e-8·s₁, below what float32 W itself determines) and Q₁ = W·V·diag(1/s) for s > drop,
    ordered by s; Q₁'s column i is off by ~eps·s₁/s_i. Then Cholesky QR of Q₁ (Gram in
    float64): Q = Q₁·R⁻¹ corrects each column by the stronger ones before it only, so, as
    with Householder QR + SVD, a strong direction is as accurate as its own s allows (a
    symmetric correction would mix the weak columns' errors into the strong ones), and the
    weak ones are left for _orth_against's extra sweep. Measured on this project's Intel VM:
    ~3 ms against 7.3 ms for Householder QR + SVD of R at 4096×72, ~4.5 against 7.9 at 11008×72.
    """
    Wd = W.double()
    lam, vec = torch.linalg.eigh(Wd.T @ Wd)
    s = lam.flip(0).clamp_min(0).sqrt()
    keep = min(int((s > drop).sum()), cap)
    if keep == 0:
        return W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1]), s.to(W.dtype)
    Vk = vec.flip(1)[:, :keep]
    Q = W @ (Vk / s[:keep]).to(W.dtype)
    Qd = Q.double()
    R, info = torch.linalg.cholesky_ex(Qd.T @ Qd, upper=True)
    if int(info) != 0 or float(torch.diagonal(R).min()) < 0.5:
        return None
    # (R ≈ I: the float32 solve loses nothing to its conditioning)
    Q = torch.linalg.solve_triangular(R.to(W.dtype), Q, upper=True, left=False)
    # W ≈ Q₁·diag(s)·Vᵀ = Q·R·diag(s)·Vᵀ, without the directions dropped
    return Q, ((R * s[:keep]) @ Vk.T).to(W.dtype), s.to(W.dtype)


class _Cols:
    """A basis that grows by blocks of columns, without torch.cat's copy of all of it.

    A (rows × capacity) buffer; ``mat`` is the view of its first ``count`` columns (row
    stride = capacity, which matmuls take without copying), and appending writes only
    the new block. Measured: cat of the growing bases took 11–16% of the small-matrix
    work of a k = 8–32 solve on 4096×11008; a column-major buffer is no better (the
    transposing copy into it costs ~1 ms per 11008×40 block).
    """

    def __init__(self, rows: int, like: Tensor, cap: int, first: int):
        # start small and double up to ``cap``: a solve that stops after a few passes (top-1,
        # warm starts) would otherwise pay for first-touching a buffer it barely uses
        self.cap = cap
        self.buf = like.new_empty(rows, max(min(first, cap), 1))
        self.count = 0

    @property
    def mat(self) -> Tensor:
        return self.buf[:, :self.count]

    def append(self, X: Tensor):
        end = self.count + X.shape[1]
        if end > self.buf.shape[1]:
            grown = self.buf.new_empty(self.buf.shape[0], min(max(end, 2 * self.buf.shape[1]), max(end, self.cap)))
            grown[:, :self.count] = self.buf[:, :self.count]
            self.buf = grown
        self.buf[:, self.count:end] = X
        self.count = end

    def reset(self, X: Tensor):
        self.count = 0
        self.append(X)


def _gaussian(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    # Drawn on the CPU, so a seed gives the same start on any device; float32 because
    # torch draws float64 normals ~5× slower (0.3 ms for 11008 of them, per warm start).
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32)


def _random_orth(rows: int, cols: int, gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.linalg.qr(_gaussian(rows, cols, gen).to(device=like.device, dtype=like.dtype))[0]


def _ritz(C: Tensor, t: int, cdtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """The top min(t, min(C.shape)) singular triplets (P, σ, Q) of the Rayleigh–Ritz matrix C.

    For a float32 solve, through the eigendecomposition of the smaller Gram matrix in
    float64, about 2× faster than an SVD of C at the sizes a Krylov basis reaches (13.2 →
    6.3 ms at 320×320, 2 cores). The other side's vectors, C·q/σ, satisfy C·q = σ·p exactly
    as the residual shortcut needs, but lose orthogonality like ~2e-16·(σ₁/σ_i)² (measured:
    4e-9 at σ_i = 1e-4·σ₁, 2e-7 at 1e-5·σ₁), so the shortcut is taken only where every
    wanted σ_i ≥ 1e-4·σ₁, which keeps that loss below float32 rounding. A float64 solve
    (whose vectors must be orthonormal to ~1e-14) and a wider spectrum get a plain SVD.
    """
    Cd = C.double()
    r = min(C.shape)
    t = min(t, r)
    if cdtype != torch.float64:
        right = C.shape[1] <= C.shape[0]  # the Gram matrix of the smaller side
        lam, vec = torch.linalg.eigh(Cd.T @ Cd if right else Cd @ Cd.T)
        lam, vec = lam.flip(0)[:t], vec.flip(1)[:, :t]
        sig = lam.clamp_min(0).sqrt()
        if sig[-1] > 1e-4 * sig[0]:
            other = (Cd @ vec if right else Cd.T @ vec) / sig
            P, Q = (other, vec) if right else (vec, other)
            return P.to(cdtype), sig.to(cdtype), Q.to(cdtype)
    P, sig, Qt = torch.linalg.svd(Cd, full_matrices=False)
    return P[:, :t].to(cdtype), sig[:t].to(cdtype), Qt[:t].T.to(cdtype)


def _residual_estimate(E_u: Optional[Tensor], E_v: Optional[Tensor], Pk: Tensor, Qk: Tensor) -> Tensor:
    """max(‖Δ·v_i − σ_i·u_i‖, ‖Δᵀ·u_i − σ_i·v_i‖) from the newest blocks (see the solver)."""
    est = Pk.new_zeros(Pk.shape[1])
    if E_u is not None:  # the newest columns of YV are the products of V's newest columns
        est = torch.maximum(est, torch.linalg.vector_norm(E_u @ Qk[-E_u.shape[1]:], dim=0))
    if E_v is not None:
        est = torch.maximum(est, torch.linalg.vector_norm(E_v @ Pk[-E_v.shape[1]:], dim=0))
    return est


def _residuals(U: Tensor, ZU: Tensor, V: Tensor, YV: Tensor, P: Tensor, sig: Tensor, Q: Tensor,
               sel: Union[Tensor, slice]) -> Tuple[Tensor, Tensor, Tensor]:
    """Residual vectors of the Ritz triplets ``sel`` (indices or a slice), from the stored products:
    Δ·v − σu = YV·q − U·p·σ (m × |sel|) and Δᵀ·u − σv = ZU·p − V·q·σ (n × |sel|), and
    max(‖·‖, ‖·‖) per triplet. Both are orthogonal to their basis up to rounding
    (Uᵀ·(YV·q − U·p·σ) = C·q − σp = 0)."""
    Ps, Qs, ss = P[:, sel], Q[:, sel], sig[sel]
    RL = YV @ Qs - U @ (Ps * ss)
    RR = ZU @ Ps - V @ (Qs * ss)
    return RL, RR, torch.maximum(torch.linalg.vector_norm(RL, dim=0), torch.linalg.vector_norm(RR, dim=0))


def _fix_signs(U: Tensor, V: Tensor) -> Tuple[Tensor, Tensor]:
    """Flip each (u_i, v_i) so that u_i's largest-magnitude entry is positive."""
    if U.shape[1] == 0:
        return U, V
    idx = U.abs().argmax(dim=0)
    sgn = torch.sign(U.gather(0, idx[None, :]))[0]
    sgn[sgn == 0] = 1
    return U * sgn, V * sgn


def _start_block(Q0: Tensor, cols: int, gen: torch.Generator) -> Tensor:
    """Orthonormal (rows × cols) block whose leading columns span Q0's, the rest random.

    One Householder QR of [Q0 | Gaussian]: Q is orthonormal to rounding whether or not Q0
    is (a user's warm start may be neither orthonormal nor of full rank). Needs cols ≤ rows.
    """
    have = min(Q0.shape[1], cols)
    return torch.linalg.qr(torch.cat([Q0[:, :have], _gaussian(Q0.shape[0], cols - have, gen).to(Q0)], 1))[0]


def _complete(Q: Tensor, cols: int, gen: torch.Generator) -> Tensor:
    """Extend orthonormal Q to ``cols`` ≤ rows columns with directions orthogonal to it.

    The new columns are the trailing ones of one Householder QR of [Q | Gaussian]: they are
    orthogonal to span(Q) to rounding however close the Gaussian block falls to it, so
    there is nothing to retry (drawing until a projected block cleared a threshold could
    loop for seconds, or forever, once Q filled most of the space)."""
    have = Q.shape[1]
    if have >= cols:
        return Q
    return torch.cat([Q, _start_block(Q, cols, gen)[:, have:]], dim=1)


# ------------------------------------------------------------------ solver


def svd_lowrank(
    A: Tensor,
    k: int = 1,
    *,
    base: Optional[Tensor] = None,
    init: Union["LowRankSVD", Tuple[Tensor, Tensor], None] = None,
    tol: float = 1e-4,
    max_passes: Optional[int] = None,
    oversample: Optional[int] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
    fro: bool = False,
    cluster_tol: Optional[float] = CLUSTER_TOL,
) -> LowRankSVD:
    """Top-k singular triplets of ``A − base`` without forming it.

    Args:
        A: (m, n) weight, bfloat16 / float16 / float32 / float64, any strides.
        k: number of triplets (≥ 1); k ≥ min(m, n) is clipped and gives the exact SVD.
        base: (m, n) weight of A's dtype and device, or None for A itself.
        init: a previous :class:`LowRankSVD` (its ``basis`` is reused: the top-k Ritz
            vectors and the near-degenerate oversampled ones, see ``WARM_GAP``) or a
            ``(U, V)`` pair of shapes (m, j), (n, j): warm start, e.g. from the
            previous checkpoint. The first pass is then one fused two-sided read of the
            basis (at most k + oversample columns) and one random column — or, for a block
            wider than ``FUSED_WARM_MAX``, a one-sided read of the smaller side's.
        tol: stop when every residual ``max(‖Δv_i − σ_i u_i‖, ‖Δᵀu_i − σ_i v_i‖)/σ_1``
            is ≤ tol. For bf16/fp16/fp32 weights the products are fp32, so tolerances
            much below ~1e-6 may not be reachable; the result then says
            ``converged=False``.
        max_passes: cap on reads of A and base (default 40); reaching it returns the
            best triplets with ``converged=False`` rather than raising.
        oversample: extra basis columns (default :func:`default_oversample`).
        seed: seeds the random start (None means 0: results are reproducible).
        backend: "auto", "torch", "cpu" or "triton" (see :mod:`pyrank.ops`).
        fro: also return ‖A − base‖_F (``result.fro``) and the number of entries where
            A ≠ base (``result.nnz``), both from the first pass — no extra read.
        cluster_tol: a triplet whose Ritz value is closer to a neighbouring one than its
            residual (gap_i ≤ r_i, both relative to σ_1) has no determined singular vector
            at that accuracy (Wedin: sin θ ≤ r_i/gap_i ≥ 1) — e.g. inside the noise bulk
            of an RL update, where σ_k ≈ σ_k+1 ≈ …. Such a triplet is accepted once
            r_i ≤ cluster_tol, which bounds its σ's distance to a singular value of Δ by
            cluster_tol·σ_1, instead of spending passes on resolving the cluster; it is
            reported in ``certified`` as False. Triplets with a gap are always converged
            to ``tol``. None (or a value ≤ tol): every triplet to ``tol``, as a plain
            residual test.

    Raises:
        ValueError: k < 1, bad shapes, or NaN/Inf in A or base (named).
    """
    # The solve runs in inference mode: no autograd bookkeeping on its hundreds of small torch
    # ops (a warm top-1 solve: 8.9 → 8.6 ms on 8960×1536, 2.1 → 1.8 ms on 256×1536, Intel VM, 2
    # cores, medians of 40). Its results are copied out of that mode, so a caller may use them
    # with autograd (as adapter weights, say).
    with torch.inference_mode():
        out = _svd_lowrank(A, k, base, init, tol, max_passes, oversample, seed, backend, fro, cluster_tol)
    return _outside_inference(out)


def _outside_inference(out: LowRankSVD) -> LowRankSVD:
    """``out`` with its tensors copied out of inference mode (where they were made)."""
    def own(t):
        return t.clone() if isinstance(t, Tensor) and t.is_inference() else t

    out.U, out.S, out.V, out.residual, out.certified = map(own, (out.U, out.S, out.V, out.residual, out.certified))
    if out.basis is not None:
        out.basis = tuple(map(own, out.basis))
    return out


def _svd_lowrank(A, k, base, init, tol, max_passes, oversample, seed, backend, fro, cluster_tol) -> LowRankSVD:
    """svd_lowrank's solve (arguments as there)."""
    ops.check_weights(A, base, names=("A", "base"))
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if cluster_tol is not None and not (isinstance(cluster_tol, (int, float)) and cluster_tol >= 0
                                        and math.isfinite(cluster_tol)):
        raise ValueError(f"cluster_tol must be None or a finite number >= 0, got {cluster_tol!r}")
    ctol = tol if cluster_tol is None else max(float(cluster_tol), tol)
    m, n = A.shape
    if m == 0 or n == 0:
        raise ValueError(f"A is empty (shape {tuple(A.shape)})")
    name, _ = ops.resolve_backend(backend, A.device)  # fail early, and once

    k = min(k, m, n)
    p = default_oversample(k) if oversample is None else int(oversample)
    if p < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    l = min(k + p, m, n)  # block size
    max_passes = 40 if max_passes is None else int(max_passes)
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    cdtype = ops.compute_dtype(A.dtype)
    eps = torch.finfo(cdtype).eps
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    dev = A.device
    like = torch.empty(0, dtype=cdtype, device=dev)
    # Krylov bases grow by ≤ l columns a pass; restart beyond this (measured: a larger
    # basis saves passes, and (m+n)·max_basis floats is still small next to A)
    max_basis = max(8 * l, 64)

    # ---- start blocks: pending directions whose products are not yet known
    if init is not None:
        U0, V0 = _init_bases(init, m, n, dev, cdtype)
        # A random column rides along: it makes a stale (invariant but no longer dominant)
        # warm subspace impossible to mistake for the answer, and lets a zero product prove
        # Δ = 0. (One is enough for both; each extra column costs compute on every pass.)
        # (the block is as wide as the basis given, ≤ l: see WARM_GAP for how results choose it)
        w = min(l, U0.shape[1], V0.shape[1]) + 1
        pend_u = _start_block(U0[:, :w - 1], min(m, w), gen)
        pend_v = _start_block(V0[:, :w - 1], min(n, w), gen)
        if w > FUSED_WARM_MAX:  # a wide block: start one-sided, on the smaller side, as a cold start
            if n <= m:
                pend_u = like.new_zeros(m, 0)
            else:
                pend_v = like.new_zeros(n, 0)
    elif n <= m:  # start on the smaller side: k ≥ min(m, n) is then exact in 2 passes
        pend_u, pend_v = like.new_zeros(m, 0), _random_orth(n, l, gen, like)
    else:
        pend_u, pend_v = _random_orth(m, l, gen, like), like.new_zeros(n, 0)

    # left basis U with ZU = Δᵀ·U, right basis V with YV = Δ·V, and C = Uᵀ·YV = Uᵀ·Δ·V
    cap = max_basis + l
    # (a cold start's full-block passes reach ~3 blocks a side before the narrow expansion;
    # a warm one stops within a few narrow passes)
    first = 2 * l + 2 if init is not None else 4 * l + 2
    bU, bZU, bV, bYV = (_Cols(r, like, cap, first) for r in (m, n, n, m))
    C = like.new_zeros(0, 0)
    fro_value = nnz_value = None
    scale = 0.0  # max product column norm seen: a lower bound on ‖Δ‖₂, sets drop thresholds
    passes = 0
    watch: Optional[Tensor] = None  # narrow expansion: the top-k triplets not yet accepted
    narrow_max = min(NARROW_MAX, l // 2)

    def narrow_sel(idx, kk, nsig):
        """The triplets a narrow expansion computes residuals of: ``idx``, then NARROW_EXTRA below the k-th."""
        return torch.cat([idx, torch.arange(kk, min(kk + NARROW_EXTRA, nsig))])

    def rotate(P, Q, keep):
        """Thick restart: the bases become the top-``keep`` Ritz vectors, their stored
        products rotated alike (no pass). Returns the new U, ZU, V, YV and C = Uᵀ·YV
        (≈ diag(σ), recomputed: keep² entries)."""
        bU.reset(U @ P[:, :keep])
        bZU.reset(ZU @ P[:, :keep])
        bV.reset(V @ Q[:, :keep])
        bYV.reset(YV @ Q[:, :keep])
        return bU.mat, bZU.mat, bV.mat, bYV.mat, bU.mat.T @ bYV.mat

    def stop(P, sig, Q, sk, exhausted, force):
        """The result if the exact residuals allow a stop (always with ``force``), else those
        residuals (relative to σ₁: what the caller continues from)."""
        kk = sk.shape[0]
        sig1 = float(sig[0]) if sig.numel() else 0.0
        rel = _residuals(U, ZU, V, YV, P, sig, Q, slice(0, kk))[2] / sig1 if sig1 > 0 else torch.zeros_like(sk)
        converged = (kk == k or exhausted) and bool((rel <= tol).all())
        # (accepted includes converged: _accepted admits every triplet with residual ≤ tol)
        accepted = (kk == k or exhausted) and bool(_accepted(rel, sig, sig1, tol, ctol).all())
        if not (accepted or force):
            return rel
        out = _finish(U, V, P, sig, Q, rel, k, l, passes, converged, drop / max(sig1, drop), gen, tol)
        out.fro, out.nnz = fro_value, nnz_value
        return out

    while True:
        has_u, has_v = pend_u.shape[1] > 0, pend_v.shape[1] > 0
        if not (has_u or has_v):
            # A restart (or a narrow expansion) found no residual direction above the drop
            # threshold on either side: the kept (watched) Ritz vectors span invariant
            # subspaces (to rounding), so the Krylov space is exhausted and this is the
            # answer the solver can give.
            P, sig, Q = _ritz(C, l, cdtype)
            return stop(P, sig, Q, sig[:min(k, sig.shape[0])], True, True)
        # ---- one pass: multiply the pending blocks (fused when both sides have some)
        want_sq = fro and passes == 0  # ‖Δ‖_F and #{Δ ≠ 0} ride on the first read
        if has_u and has_v:
            out = ops.delta_mm_both(A, base, pend_v, pend_u, sqnorm=want_sq, nnz=want_sq, backend=name)
            yv_new, zu_new = out[0], out[1]
        elif has_v:
            out = ops.delta_mm(A, base, pend_v, sqnorm=want_sq, nnz=want_sq, backend=name)
            yv_new, zu_new = (out[0] if want_sq else out), None
        else:
            out = ops.delta_mm_t(A, base, pend_u, sqnorm=want_sq, nnz=want_sq, backend=name)
            yv_new, zu_new = None, (out[0] if want_sq else out)
        if want_sq:
            fro_value, nnz_value = math.sqrt(max(0.0, float(out[-2]))), int(out[-1])
        passes += 1
        for t in (yv_new, zu_new):
            if t is not None:
                # a NaN or Inf product makes its column norm non-finite (so does a finite
                # product whose fp32 norm overflows: the full check tells them apart)
                top = float(torch.linalg.vector_norm(t, dim=0).max())
                if not math.isfinite(top):
                    if not bool(torch.isfinite(t).all()):
                        _raise_nonfinite(A, base)
                    top = float(torch.linalg.vector_norm(t.double(), dim=0).max())
                scale = max(scale, top)
        if scale == 0.0:
            # Every start block had a random part, so Δ·(random) = 0 means Δ = 0.
            return _zero_result(m, n, k, passes, gen, like, fro_value, nnz_value)
        # C grows by the new columns Uᵀ·yv_new and the new rows pend_uᵀ·YV (the products
        # of pend_v and pend_u): m·l·(|U| + |V|) flops instead of m·|U|·|V| for all of it
        if zu_new is not None:
            C = torch.cat([C, pend_u.T @ bYV.mat], 0)
            bU.append(pend_u)
            bZU.append(zu_new)
        if yv_new is not None:
            C = torch.cat([C, bU.mat.T @ yv_new], 1)
            bV.append(pend_v)
            bYV.append(yv_new)
        U, ZU, V, YV = bU.mat, bZU.mat, bV.mat, bYV.mat
        drop = 64 * eps * scale

        # ---- Krylov expansion: what the newest products add to the bases
        # (keep every direction the block adds: one dropped here would never come back,
        # since later expansions only look at newer products, and the residual would stall)
        # (I − U·Uᵀ)·yv_new = pend_u·E_u and (I − V·Vᵀ)·zu_new = pend_v·E_v
        # The first Gram–Schmidt sweep's coefficients are blocks of C: Uᵀ·yv_new is its
        # newest columns, and Vᵀ·zu_new = (Δ·V)ᵀ·pend_u its newest rows, transposed (from
        # other products, so equal up to their rounding, which the second sweep removes)
        if watch is None:
            if yv_new is not None:
                pend_u, E_u = _orth_against(U, yv_new, drop, yv_new.shape[1], C[:, C.shape[1] - yv_new.shape[1]:])
            else:
                pend_u, E_u = U[:, :0], None
            if zu_new is not None:
                pend_v, E_v = _orth_against(V, zu_new, drop, zu_new.shape[1], C[C.shape[0] - zu_new.shape[1]:].T)
            else:
                pend_v, E_v = V[:, :0], None
        if not (U.shape[1] and V.shape[1]):
            continue  # cold start: one side has no products yet, no Rayleigh–Ritz possible

        # ---- Rayleigh–Ritz; residuals come from stored products, no extra pass
        P, sig, Q = _ritz(C, l, cdtype)
        kk = min(k, sig.shape[0])
        Pk, Qk, sk = P[:, :kk], Q[:, :kk], sig[:kk]
        sig1 = float(sig[0])
        # Residuals, cheaply: Δ·v − σu = U·(C·q − σp) + (I − U·Uᵀ)·YV·q, and C·q = σp, and
        # of YV only the newest block has a part outside span(U) (older blocks' parts
        # became directions of U), so ‖Δ·v − σu‖ = ‖E_u·q_new‖ — likewise on the right —
        # up to rounding and dropped directions. Exact residuals from the stored products
        # (m·|basis|·k flops) are computed only to confirm a stop and for the result.
        if watch is None:
            est = _residual_estimate(E_u, E_v, Pk, Qk)
            exhausted = pend_u.shape[1] == 0 and pend_v.shape[1] == 0
        else:  # narrow: the watched triplets' exact residuals (the others were accepted)
            watch = watch[watch < kk]
            sel = narrow_sel(watch, kk, sig.shape[0])
            RL, RR, nrm = _residuals(U, ZU, V, YV, P, sig, Q, sel)
            est = torch.zeros_like(sk)
            est[watch] = nrm[:watch.numel()]
            exhausted = False
        ok = _accepted(est / sig1, sig, sig1, tol, ctol) if sig1 > 0 else torch.zeros(kk, dtype=torch.bool)
        if bool(ok.all()) or exhausted or passes >= max_passes:
            out = stop(P, sig, Q, sk, exhausted, exhausted or passes >= max_passes)
            if isinstance(out, LowRankSVD):
                return out
            # refused: what the exact residuals (``out``) refuse is what is left to do (in a
            # narrow expansion, possibly a triplet no longer watched)
            ok = _accepted(out, sig, sig1, tol, ctol)

        # ---- narrow expansion: once all but a few of the top-k are accepted, expand by the
        # residual vectors of the unaccepted ones (plus NARROW_EXTRA Ritz triplets below the
        # k-th) instead of by the whole newest block, both sides in one fused read
        need = (~ok).nonzero().flatten()
        if sig1 > 0 and kk == k and (watch is not None or need.numel() + NARROW_EXTRA <= narrow_max):
            if watch is not None and bool(torch.isin(need, watch).all()):
                cols = torch.cat([(~ok[watch]).nonzero().flatten(), torch.arange(watch.numel(), sel.numel())])
                RL, RR = RL[:, cols], RR[:, cols]
            else:
                if watch is None and min(U.shape[1], V.shape[1]) > NARROW_RESTART * l:
                    # entering the narrow expansion with a large basis: restart it to the
                    # top-l Ritz vectors (see NARROW_RESTART)
                    U, ZU, V, YV, C = rotate(P, Q, min(l, sig.shape[0]))
                    P, sig, Q = _ritz(C, l, cdtype)
                sel = narrow_sel(need, kk, sig.shape[0])
                RL, RR, _ = _residuals(U, ZU, V, YV, P, sig, Q, sel)
            watch = need
            # (one Gram–Schmidt sweep: the residuals are orthogonal to the bases but for rounding)
            pend_u = _orth_against(U, RL, drop, RL.shape[1], sweeps=1)[0]
            pend_v = _orth_against(V, RR, drop, RR.shape[1], sweeps=1)[0]

        if U.shape[1] + pend_u.shape[1] > max_basis or V.shape[1] + pend_v.shape[1] > max_basis:
            # thick restart: keep the top-l Ritz vectors, rotate their stored products, and
            # continue from their residual directions
            U, ZU, V, YV, C = rotate(P, Q, min(l, sig.shape[0]))
            pend_u = _orth_against(U, YV, drop, l)[0]
            pend_v = _orth_against(V, ZU, drop, l)[0]
            watch = None


def _init_bases(init, m, n, dev, cdtype) -> Tuple[Tensor, Tensor]:
    if isinstance(init, LowRankSVD):
        U0, V0 = init.basis if init.basis is not None else (init.U, init.V)
    elif isinstance(init, (tuple, list)) and len(init) == 2:
        U0, V0 = init
    else:
        raise TypeError("init must be a LowRankSVD or a (U, V) pair of tensors")
    for name, T, rows in (("init U", U0, m), ("init V", V0, n)):
        if not isinstance(T, Tensor) or T.dim() != 2 or T.shape[0] != rows:
            raise ValueError(f"{name} must be a 2-D tensor with {rows} rows, got "
                             f"{tuple(T.shape) if isinstance(T, Tensor) else type(T).__name__}")
        if not bool(torch.isfinite(T).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    return U0.to(device=dev, dtype=cdtype), V0.to(device=dev, dtype=cdtype)


def _raise_nonfinite(A: Tensor, base: Optional[Tensor]):
    for nm, T in (("A", A), ("base", base)):
        if T is not None and not bool(torch.isfinite(T).all()):
            raise ValueError(f"{nm} contains NaN or Inf; pyrank does not propagate non-finite weights")
    raise ValueError("A − base overflows to Inf in the compute dtype")


def _zero_result(m, n, k, passes, gen, like, fro=None, nnz=None) -> LowRankSVD:
    U = _random_orth(m, k, gen, like)
    V = _random_orth(n, k, gen, like)
    U, V = _fix_signs(U, V)
    z = like.new_zeros(k)
    return LowRankSVD(U, z, V, passes, z.clone(), True, fro=fro, nnz=nnz,
                      certified=torch.ones(k, dtype=torch.bool, device=z.device), basis=(U, V))


def _accepted(rel: Tensor, sig: Tensor, sig1: float, tol: float, ctol: float) -> Tensor:
    """Which of the first len(rel) Ritz triplets may stop: residual ≤ tol, or inside a
    cluster (relative gap to a neighbouring Ritz value ≤ its residual) with residual ≤ ctol."""
    ok = rel <= tol
    if ctol <= tol or sig1 <= 0 or bool(ok.all()):  # (the common case costs one comparison)
        return ok
    kk = rel.shape[0]
    s = sig[:kk + 1].double() / sig1
    gaps = torch.full((kk,), math.inf, dtype=torch.float64, device=rel.device)
    if kk > 1:
        d = s[:kk - 1] - s[1:kk]
        gaps[1:] = d
        gaps[:-1] = torch.minimum(gaps[:-1], d)
    if s.shape[0] > kk:  # the next Ritz value (oversampling): the last wanted one's lower neighbour
        gaps[-1] = torch.minimum(gaps[-1], s[kk - 1] - s[kk])
    r = rel.double()
    return ok | ((gaps <= r) & (r <= ctol))


def _finish(U, V, P, sig, Q, rel, k, l, passes, converged, pad_res, gen, tol) -> LowRankSVD:
    kk = rel.shape[0]
    Uk, Vk, S = U @ P[:, :kk], V @ Q[:, :kk], sig[:kk]
    if kk < k:
        # Δ has numerical rank kk < k and the Krylov space is exhausted: the remaining
        # triplets have σ = 0 and vectors orthogonal to Δ's ranges; their residual is the
        # drop threshold below which directions were discarded.
        Uk = _complete(Uk, k, gen)
        Vk = _complete(Vk, k, gen)
        S = torch.cat([S, S.new_zeros(k - kk)])
        rel = torch.cat([rel, rel.new_full((k - kk,), pad_res)])
    Uk, Vk = _fix_signs(Uk, Vk)
    keep = min(l, P.shape[1])
    if kk >= 1 and float(sig[kk - 1]) > 0:  # the warm basis: see WARM_GAP
        keep = min(keep, kk + int((sig[kk:keep] >= WARM_GAP * sig[kk - 1]).sum()))
    basis = (U @ P[:, :keep], V @ Q[:, :keep])
    return LowRankSVD(Uk, S, Vk, passes, rel, bool(converged), certified=rel <= tol, basis=basis)


# Below this many elements per matrix the drop-in runs torch's own implementation: its
# per-call overhead is lower, and a matrix this small is read from cache either way, so a
# fused read saves nothing. Measured with M on this project's 2-core VM (q = 6, niter = 2):
# pyrank/torch time 1.31 (float32) and 1.57 (float64) at 64×64, 0.87 and 1.20 at 128×128,
# 0.52 and 0.89 at 256×256 (benchmarks/bench_lowrank.py has the full table).
DROPIN_MIN_ELEMS = 1 << 14


def torch_svd_lowrank(A: Tensor, q: Optional[int] = 6, niter: Optional[int] = 2,
                      M: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Drop-in for ``torch.svd_lowrank(A, q, niter, M)``, with pyrank's fused kernels.

    Same arguments, same algorithm, same result: Halko et al.'s randomized range finder
    (their Algorithm 5.1) with ``niter`` subspace iterations and a Householder QR after
    every product, exactly as torch runs it — a fixed amount of work, 2·niter + 2 reads of
    A (and M) — drawing its Gaussian start from the global RNG as torch does (one
    ``torch.randn(min(m, n), q)`` per call, shared by a batch), so a seeded call gives
    torch's answer to rounding. Returns ``(U, S, V)`` with A − M ≈ U·diag(S)·Vᴴ, U:
    (*, m, k), S: (*, k), V: (*, n, k), k = min(q, m, n).

    What pyrank changes is how A − M is read: each product is one fused pass over A and M
    (``ops.delta_mm`` / ``delta_mm_t``) instead of two matmuls and a subtraction, and M may
    be any tensor that broadcasts to A (a (1, n) column mean is read as a stride-0 view,
    never expanded). bfloat16/float16 A, which torch.svd_lowrank cannot take, is accepted:
    products accumulate in float32 and the start is drawn in float32, so the result is
    torch's on the float32 copies of A and M, to rounding; results are then float32
    (A's dtype otherwise).

    Where pyrank has no kernel or nothing to save, the call is torch's own implementation,
    unchanged (and so are its errors): sparse, complex or integer A; tensor subclasses;
    inputs that require grad while grad mode is on (torch's version is differentiable);
    empty inputs; devices other than CPU and CUDA; float32/float64 A without M (the same
    reads either way); and matrices of fewer than ``DROPIN_MIN_ELEMS`` elements (bf16/fp16
    ones are upcast to float32 first). Under ``torch.jit.script`` it is always torch's.

    For a solve that stops at a requested accuracy instead of after ``niter`` iterations,
    and that warm-starts across checkpoints, use :func:`svd_lowrank`. The backend follows
    ``PYRANK_BACKEND`` (default "auto").
    """
    if not torch.jit.is_scripting():
        route = _dropin_route(A, M)
        if route == "pyrank":
            return _fused_svd_lowrank(A, q, niter, M, "auto")
        if route == "upcast":
            return _torch_lowrank._svd_lowrank(A.float(), q=q, niter=niter, M=None if M is None else M.float())
    return _torch_lowrank._svd_lowrank(A, q=q, niter=niter, M=M)


def _dropin_route(A, M) -> str:
    """How the drop-in runs a call: "pyrank" (fused kernels), "upcast" (a small bf16/fp16
    problem, by torch on its float32 copy) or "torch" (unchanged). See torch_svd_lowrank."""
    if type(A) is not Tensor or (M is not None and type(M) is not Tensor):
        return "torch"  # tensor subclasses keep torch's __torch_function__ dispatch
    if A.layout != torch.strided or A.dtype not in ops.WEIGHT_DTYPES or A.dim() < 2 or A.numel() == 0:
        return "torch"
    if M is not None and (M.layout != torch.strided or M.dtype != A.dtype or M.device != A.device):
        return "torch"  # torch raises, or promotes, as it always has
    if torch.is_grad_enabled() and (A.requires_grad or (M is not None and M.requires_grad)):
        return "torch"
    if A.device.type not in ("cpu", "cuda"):
        return "torch"
    half = A.dtype in (torch.bfloat16, torch.float16)
    if A.shape[-1] * A.shape[-2] < DROPIN_MIN_ELEMS:
        return "upcast" if half else "torch"
    return "pyrank" if (half or M is not None) else "torch"


def _fused_svd_lowrank(A: Tensor, q: Optional[int], niter: Optional[int], M: Optional[Tensor],
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """torch's ``_svd_lowrank`` step for step, every product of A − M one fused read."""
    q = 6 if q is None else q
    niter = 2 if niter is None else niter
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ValueError(f"q must be a positive int, got {q!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be a non-negative int, got {niter!r}")
    if M is not None:
        try:
            M = M.broadcast_to(A.shape)  # a view: broadcast dimensions have stride 0
        except RuntimeError:
            raise ValueError(f"M has shape {tuple(M.shape)}, which does not broadcast to "
                             f"A's {tuple(A.shape)}") from None
    *batch, m, n = A.shape
    name, _ = ops.resolve_backend(backend, A.device)
    cdtype = ops.compute_dtype(A.dtype)
    tall = m >= n  # torch works on the tall orientation: A, or Aᴴ when m < n
    k = min(q, m, n)
    # torch draws R = randn(columns of the tall operator, q) once, in A's dtype; the compute
    # dtype here (the same for float32/float64 A; float32, torch's dtype for the upcast, for bf16/fp16)
    R = torch.randn(min(m, n), q, dtype=cdtype, device=A.device)
    fwd = ops.delta_mm if tall else ops.delta_mm_t  # the tall operator times X
    adj = ops.delta_mm_t if tall else ops.delta_mm  # its adjoint times Y
    U = A.new_empty((*batch, m, k), dtype=cdtype)
    S = A.new_empty((*batch, k), dtype=cdtype)
    V = A.new_empty((*batch, n, k), dtype=cdtype)
    # batch elements one by one: views of A and of M's broadcast view (flattening the batch
    # dimensions could copy a broadcast M to full size)
    for idx in itertools.product(*map(range, batch)):
        a, mm = A[idx], None if M is None else M[idx]
        Q = torch.linalg.qr(fwd(a, mm, R, backend=name)).Q
        for _ in range(niter):
            Q = torch.linalg.qr(adj(a, mm, Q, backend=name)).Q
            Q = torch.linalg.qr(fwd(a, mm, Q, backend=name)).Q
        # B = Qᴴ·(tall operator) = (adjoint·Q)ᴴ: one more read
        Ub, Sb, Vbh = torch.linalg.svd(adj(a, mm, Q, backend=name).T, full_matrices=False)
        left, right = Q @ Ub, Vbh.T
        U[idx], S[idx], V[idx] = (left, Sb, right) if tall else (right, Sb, left)
    return U, S, V
