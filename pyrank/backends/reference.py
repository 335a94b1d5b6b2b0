"""The reference backend (public name ``"torch"``): plain PyTorch, any device.

It is the oracle every other backend is tested against, the fallback when no native
backend is available, and what computes float64 weights everywhere. It still honours
pyrank's memory promise: A − B is formed one block of rows at a time (``row_blocks``,
~4 Mi elements), never as a whole m×n temporary. The contract: :mod:`pyrank.backends`.
"""
from __future__ import annotations

import torch

from . import row_blocks as _row_blocks


def _delta(A, B, i, j, cdtype):
    d = A[i:j].to(cdtype)
    if B is not None:
        d = d - B[i:j].to(cdtype)
    return d


def delta_products(A, B, X, Y, cdtype, sqnorm):
    """(A − B)·X, (A − B)ᵀ·Y, ‖A − B‖_F² and #{A − B ≠ 0} from one pass over row blocks
    (each optional; the last two with ``sqnorm``)."""
    m, n = A.shape
    out_x = torch.empty(m, X.shape[1], dtype=cdtype, device=A.device) if X is not None else None
    out_y = torch.zeros(n, Y.shape[1], dtype=cdtype, device=A.device) if Y is not None else None
    sq = torch.zeros((), dtype=torch.float64, device=A.device) if sqnorm else None
    nz = torch.zeros((), dtype=torch.int64, device=A.device) if sqnorm else None
    for i, j in _row_blocks(m, n):
        d = _delta(A, B, i, j, cdtype)  # one read of this block serves every output
        if X is not None:
            torch.mm(d, X, out=out_x[i:j])
        if Y is not None:
            out_y.addmm_(d.t(), Y[i:j])
        if sqnorm:
            sq += torch.sum(d * d, dtype=torch.float64)
            nz += torch.count_nonzero(d)
    return out_x, out_y, (sq.to(cdtype) if sqnorm else None), (int(nz) if sqnorm else None)


def merge_lowrank(W, U, S, V, alpha, out, cdtype):
    m, n = W.shape
    US = U * (alpha * S)  # m×k, fold α·diag(S) into the left factor once
    for i, j in _row_blocks(m, n):
        blk = W[i:j].to(cdtype, copy=True)  # copy: .to() is a no-op view for fp32 W
        blk.addmm_(US[i:j], V.t())
        out[i:j] = blk.to(W.dtype)  # the one rounding to W's dtype
    return out


def delta_gram(As, B, cdtype):
    m, n = As[0].shape
    T = len(As)
    G = torch.zeros(T, T, dtype=torch.float64, device=As[0].device)
    for i, j in _row_blocks(m, T * n):  # T deltas of a block of rows at a time
        D = torch.stack([_delta(A, B, i, j, cdtype).reshape(-1) for A in As])
        G += (D @ D.T).double()
    return G
