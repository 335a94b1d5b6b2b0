"""RELEX's temporal rank-1 extrapolation (docs/METHODS.md §2), tensor by tensor."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .extrapolate import Overlay
from .fits import line_fit

__all__ = ["temporal_extrapolate", "temporal_coefficients"]


def temporal_extrapolate(base: Mapping, checkpoints: Sequence[Mapping], steps: Sequence[float],
                         to_step: float, *, names: Optional[Sequence[str]] = None,
                         backend: str = "auto") -> "Mapping[str, Tensor]":
    """RELEX's temporal rank-1 extrapolation (docs/METHODS.md §2), tensor by tensor.

    Per tensor, the deltas ΔW_t = W_t − W₀ are rows of a T × (m·n) matrix whose top
    singular triplet comes from the T × T Gram matrix G_ij = ⟨ΔW_i, ΔW_j⟩ (``ops.delta_gram``,
    one read of every checkpoint): ΔW_t ≈ c(t)·D. c(t) is extrapolated by a least-squares
    line to ``to_step`` and the prediction is W₀ + c(T)·D = W₀ + Σ_t β_t·ΔW_t, computed in
    fp32 and rounded once. ``names`` (default: every 2-D floating tensor in ``base``)
    selects the tensors; the others are passed through from ``base``.

    Returns a lazy mapping: each tensor is computed when accessed.
    """
    if len(checkpoints) != len(steps):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(steps)} steps")
    if len(steps) < 2:
        raise ValueError("temporal extrapolation needs at least 2 checkpoints")
    if names is None:
        names = [n for n in base if base[n].dim() == 2 and base[n].is_floating_point()]
    cks, fsteps = list(checkpoints), [float(s) for s in steps]
    return Overlay(base, names, lambda n: _temporal_one(n, base, cks, fsteps, float(to_step), backend))


def temporal_coefficients(G: Tensor, steps: Sequence[float], to_step: float) -> Tensor:
    """β_t such that Σ_t β_t·ΔW_t = c(T)·D for the Gram matrix G of the deltas."""
    G = G.double().cpu()
    evals, evecs = torch.linalg.eigh((G + G.T) / 2)
    lam, e = float(evals[-1]), evecs[:, -1]
    if lam <= 0:
        return torch.zeros(len(steps), dtype=torch.float64)
    if float(e.sum()) < 0:  # sign: the direction the deltas grow along
        e = -e
    s1 = math.sqrt(lam)
    c = s1 * e  # ΔW_t ≈ c(t)·D with D = Σ_t e_t ΔW_t / s1 (unit Frobenius norm)
    a, b = line_fit(steps, c[:, None])
    c_target = float(a[0] + b[0] * to_step)
    return c_target * e / s1


def _temporal_one(name, base, cks, steps, to_step, backend):
    """W₀ + Σ_t β_t·ΔW_t for one tensor (fp32 math, one rounding), a block of rows at a time
    like every other computation that forms deltas (no whole-weight fp32 copies)."""
    W0 = base[name]
    Ws = [ck[name] for ck in cks]
    for s, W in zip(steps, Ws):
        if W.shape != W0.shape or W.dtype != W0.dtype:
            raise ValueError(f"{name} at step {s:g}: shape {tuple(W.shape)} {W.dtype}, base "
                             f"has {tuple(W0.shape)} {W0.dtype}")
    G = ops.delta_gram(Ws, W0, backend=backend)
    beta = temporal_coefficients(G, steps, to_step).tolist()
    cd = ops.compute_dtype(W0.dtype)
    if W0.dim() != 2:  # (a 1-D tensor selected by name: one block)
        return _combine(W0, Ws, beta, cd)
    out = torch.empty_like(W0)
    for i, j in ops.row_blocks(*W0.shape):
        out[i:j] = _combine(W0[i:j], [W[i:j] for W in Ws], beta, cd)
    return out


def _combine(W0, Ws, beta, cd):
    acc = W0.to(cd, copy=True)
    for bt, W in zip(beta, Ws):
        acc.add_(W.to(cd) - W0.to(cd), alpha=bt)
    return acc.to(W0.dtype)
