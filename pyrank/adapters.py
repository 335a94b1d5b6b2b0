"""SVD-initialized LoRA adapters (METHODS.md §4), with peft's conventions.

With scaling s = lora_alpha / r and r singular triplets (U_r, S_r, V_r) of W:
S' = S_r / s, B = U_r·diag(√S'), A = diag(√S')·V_rᵀ, W_res = W − s·B·A (= W − U_r S_r V_rᵀ).
A is (r, in_features) = (r, n) and B is (out_features, r) = (m, r), as peft's lora_A and
lora_B weights; A, B and W_res come back in W's dtype (W_res rounded once, by the fused
merge kernel).

* :func:`pissa_init` — the top r triplets (pyrank's randomized SVD, to ``tol``).
* :func:`milora_init` — the bottom r triplets, by an exact method: the eigendecomposition
  of the smaller Gram matrix in float64 (randomized range finders cannot find minor
  components).

peft integration (filling a peft model's LoRA layers) is not built yet.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import ops
from .linalg import svd_lowrank

__all__ = ["pissa_init", "milora_init"]


def _check(W: Tensor, r: int, lora_alpha: float):
    ops.check_weights(W, None, names=("W", None))
    if not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be an int in [1, min(W.shape) = {min(W.shape)}], got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")


def _factors(W, U, S, V, r, lora_alpha, backend):
    s = lora_alpha / r
    root = torch.sqrt(S.double() / s)
    B = (U.double() * root).to(W.dtype)
    A = (root[:, None] * V.double().T).to(W.dtype)
    W_res = ops.merge_lowrank(W, U, S, V, alpha=-1.0, backend=backend)  # W − U S Vᵀ, one rounding
    return A, B, W_res


def pissa_init(W: Tensor, r: int, lora_alpha: float, *, tol: float = 1e-6,
               backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """PiSSA: (A, B, W_res) from the top-r singular triplets of W (residuals ≤ ``tol``·σ₁)."""
    _check(W, r, lora_alpha)
    res = svd_lowrank(W, r, tol=tol, backend=backend)
    return _factors(W, res.U, res.S, res.V, r, lora_alpha, backend)


def smallest_triplets(W: Tensor, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The r smallest singular triplets (U (m, r), S (r,) ascending, V (n, r)), float64,
    through the eigendecomposition of the smaller Gram matrix. Accurate for σ ≳ 1e-8·σ₁."""
    Wd = W.double()
    m, n = Wd.shape
    G = Wd.T @ Wd if n <= m else Wd @ Wd.T
    evals, evecs = torch.linalg.eigh(G)  # ascending
    sig = evals[:r].clamp_min(0).sqrt()
    small = evecs[:, :r]
    other = (Wd @ small) if n <= m else (Wd.T @ small)  # = the other side's vectors × σ
    # normalize; where σ is (numerically) zero, complete with directions orthogonal to the rest
    norms = other.norm(dim=0)
    ok = norms > 1e-12 * max(float(evals[-1].clamp_min(0).sqrt()), 1e-300)
    other = other / torch.where(ok, norms, torch.ones_like(norms))
    if not bool(ok.all()):
        Q, _ = torch.linalg.qr(torch.cat([other[:, ok], torch.randn(other.shape[0], int((~ok).sum()),
                                                                   dtype=torch.float64,
                                                                   generator=torch.Generator().manual_seed(0))], 1))
        other = torch.cat([other[:, ok], Q[:, int(ok.sum()):]], 1)
        sig = torch.cat([sig[ok], torch.zeros(int((~ok).sum()), dtype=torch.float64)])
        small = torch.cat([small[:, ok], small[:, ~ok]], 1)
    U, V = (other, small) if n <= m else (small, other)
    return U, sig, V


def milora_init(W: Tensor, r: int, lora_alpha: float, *, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """MiLoRA: (A, B, W_res) from the r smallest singular triplets of W (exact, float64)."""
    _check(W, r, lora_alpha)
    U, S, V = smallest_triplets(W, r)
    cd = ops.compute_dtype(W.dtype)
    return _factors(W, U.to(cd), S.to(cd), V.to(cd), r, lora_alpha, backend)
