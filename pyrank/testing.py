"""Synthetic weights with known structure, for tests and benchmarks (no downloads).

``rl_like_pair`` imitates an RL update of a bf16 weight: a few strong low-rank
directions plus dense noise, small enough that rounding W_0 + ΔW to bf16 leaves many
entries bitwise unchanged (the update sparsity RL runs show). ``with_spectrum``
builds a matrix with exactly prescribed singular values.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["rl_like_pair", "rl_like_series", "with_spectrum", "random_orthonormal", "rotate"]


def random_orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """A (rows, cols) float64 matrix with orthonormal columns (cols ≤ rows)."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed, not just orthonormal


def with_spectrum(m: int, n: int, sigma: Sequence[float], seed: int = 0) -> Tensor:
    """A float64 (m, n) matrix whose nonzero singular values are ``sigma`` (len ≤ min(m, n))."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(list(sigma), dtype=torch.float64)
    r = s.numel()
    if r > min(m, n):
        raise ValueError(f"{r} singular values do not fit a {m}x{n} matrix")
    return (random_orthonormal(m, r, gen) * s) @ random_orthonormal(n, r, gen).T


def rl_like_pair(
    m: int,
    n: int,
    *,
    rank: int = 4,
    decay: float = 0.35,
    update_rms: float = 4e-5,
    lowrank_energy: float = 0.5,
    weight_std: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    directions: Optional[Tuple[Tensor, Tensor]] = None,
    W0: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(W_t, W_0) in ``dtype``: W_t = round(W_0 + ΔW).

    ΔW has RMS ``update_rms``; ``lowrank_energy`` of its energy is in ``rank``
    directions with singular values decaying by ``decay`` (σ_2/σ_1 = decay), the rest
    is Gaussian noise. ``directions=(a, b)`` (float64, (m, rank) and (n, rank)
    orthonormal) fixes the low-rank directions, e.g. to build a drifting series;
    ``W0`` reuses a base weight.
    """
    gen = torch.Generator().manual_seed(seed)
    if W0 is None:
        W0 = (torch.randn(m, n, generator=gen) * weight_std).to(dtype)
    if directions is None:
        a, b = random_orthonormal(m, rank, gen), random_orthonormal(n, rank, gen)
    else:
        a, b = directions
    s = decay ** torch.arange(rank, dtype=torch.float64)
    total = update_rms**2 * m * n
    s = s * (lowrank_energy * total / float((s**2).sum())) ** 0.5
    noise = torch.randn(m, n, generator=gen) * float(((1 - lowrank_energy) * total / (m * n)) ** 0.5)
    dW = ((a * s) @ b.T).float() + noise
    Wt = (W0.float() + dW).to(dtype)
    return Wt, W0


def rotate(M: Tensor, angle: float, gen: torch.Generator) -> Tensor:
    """Turn every column of orthonormal M by ``angle`` rad towards a random orthogonal direction."""
    G = torch.randn(M.shape, generator=gen, dtype=torch.float64)
    G -= M @ (M.T @ G)
    G /= G.norm(dim=0)
    Q, R = torch.linalg.qr(M * torch.cos(torch.tensor(angle)) + G * torch.sin(torch.tensor(angle)))
    return Q * torch.sign(torch.diagonal(R))


def rl_like_series(
    m: int, n: int, steps: int, *, angle: float = 1e-3, rank: int = 4, seed: int = 0, **kw
) -> Tuple[Tensor, list]:
    """(W_0, [W_1, …, W_steps]): checkpoints whose low-rank update directions turn by
    ``angle`` rad from one step to the next (same base and noise throughout), as
    consecutive RL checkpoints do. Extra keywords go to :func:`rl_like_pair`."""
    gen = torch.Generator().manual_seed(seed)
    a, b = random_orthonormal(m, rank, gen), random_orthonormal(n, rank, gen)
    dtype = kw.pop("dtype", torch.bfloat16)
    W0 = (torch.randn(m, n, generator=gen) * kw.pop("weight_std", 0.02)).to(dtype)
    out = []
    for _ in range(steps):
        Wt, _ = rl_like_pair(m, n, rank=rank, seed=seed + 1, directions=(a, b), W0=W0, dtype=dtype, **kw)
        out.append(Wt)
        a, b = rotate(a, angle, gen), rotate(b, angle, gen)
    return W0, out
