"""Fits and predictions on rank-1 trajectories (docs/METHODS.md §1–2).

* :func:`r2_in_step` — is û(t) = σ₁(t)·u₁(t) linear in the step? (least squares, all
  coordinates, in-sample R²)
* :class:`PLS1` — AlphaRL's regression of a metric on û(t): standardize each column of
  X (T×m), one-component PLS to y, ordinary least squares y = a·z + b on the PLS score;
  and its inversion at a target metric, back to a vector û*.
* :class:`Prediction` — predicted low-rank updates per module, small enough to save,
  applied to weights tensor by tensor with the fused ``merge_lowrank``.
* :func:`rank_k_reconstruction` — the rank-k dominance model W₀ + λ·α·U_k S_k V_kᵀ.
* :func:`temporal_extrapolate` — RELEX's temporal rank-1 mode on the Gram matrix of the
  deltas (``ops.delta_gram``).

All fits run in float64 on the CPU: they are small (T × m) and precision is cheap there.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .linalg import svd_lowrank

__all__ = [
    "r2_in_step", "line_fit", "PLS1", "Factors", "Prediction", "Overlay", "rank_k_reconstruction",
    "temporal_extrapolate",
]


def _r2(y: Tensor, fit: Tensor) -> float:
    ss_tot = float(((y - y.mean(0)) ** 2).sum())
    ss_res = float(((y - fit) ** 2).sum())
    if ss_tot == 0.0:  # nothing varies: there is nothing to explain (e.g. a frozen module)
        return float("nan")
    return 1.0 - ss_res / ss_tot


def line_fit(steps: Sequence[float], X: Tensor):
    """Least-squares line X(t) ≈ a + b·t per column. Returns (a, b), float64."""
    t = torch.as_tensor(list(steps), dtype=torch.float64)
    X = X.double().cpu()
    tc = t - t.mean()
    denom = float((tc * tc).sum())
    if denom == 0.0:
        raise ValueError("a line in the step needs at least two distinct steps")
    b = (tc[:, None] * (X - X.mean(0))).sum(0) / denom
    a = X.mean(0) - b * t.mean()
    return a, b


def r2_in_step(steps: Sequence[float], X: Tensor) -> float:
    """In-sample R² of the least-squares line of every column of X (T×m) in the step.
    NaN with fewer than 3 checkpoints (two points always fit a line)."""
    if len(steps) < 3:
        return float("nan")
    a, b = line_fit(steps, X)
    t = torch.as_tensor(list(steps), dtype=torch.float64)
    return _r2(X.double().cpu(), a + t[:, None] * b)


class PLS1:
    """AlphaRL's one-component PLS of a metric y (T) on trajectories X (T×m).

    Each column of X is standardized (mean, sample std; constant columns contribute
    nothing), y too; the PLS weight is w ∝ Xsᵀ·ys, the score z = Xs·w, and the fit is
    the ordinary least squares y = a·z + b. This is what sklearn's
    ``PLSRegression(n_components=1)`` computes, followed by the paper's OLS on the score.
    """

    def __init__(self, X: Tensor, y: Sequence[float]):
        X = X.double().cpu()
        y = torch.as_tensor(list(y), dtype=torch.float64)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"{X.shape[0]} trajectories but {y.shape[0]} metric values")
        if X.shape[0] < 3:
            raise ValueError("the PLS fit needs at least 3 checkpoints")
        self.y = y
        self.x_mean = X.mean(0)
        self.x_std = X.std(0)
        self.x_std[self.x_std == 0] = 1.0
        Xs = (X - self.x_mean) / self.x_std
        ys = y - y.mean()
        w = Xs.T @ ys
        nw = float(w.norm())
        if nw == 0.0:
            raise ValueError("the metric is constant or uncorrelated with every coordinate")
        self.w = w / nw
        z = Xs @ self.w
        self.x_loadings = Xs.T @ z / float(z @ z)
        zc = z - z.mean()
        self.a = float(zc @ (y - y.mean())) / float(zc @ zc)
        self.b = float(y.mean()) - self.a * float(z.mean())
        self.r2 = _r2(y, self.a * z + self.b)

    def invert(self, y_target: float) -> Tensor:
        """The vector û* whose PLS score predicts ``y_target`` (inverse transform)."""
        if self.a == 0.0:
            raise ValueError("the PLS fit has zero slope: no score reaches a target metric")
        z = (float(y_target) - self.b) / self.a
        return z * self.x_loadings * self.x_std + self.x_mean


# ------------------------------------------------------------------ predictions


@dataclass
class Factors:
    """A low-rank update alpha·U·diag(S)·Vᵀ for one module (float32, CPU)."""

    U: Tensor
    S: Tensor
    V: Tensor
    alpha: float = 1.0


@dataclass
class Prediction:
    """Predicted low-rank updates per module.

    ``applies_to`` says which weights :meth:`apply` expects: None — the base W₀; a step k —
    the checkpoint at step k (AlphaRL with base="last"). ``info`` records how the prediction
    was made.
    """

    factors: Dict[str, Factors]
    applies_to: Optional[float]
    info: dict = field(default_factory=dict)

    def apply(self, weights: Mapping, *, dtype: Optional[torch.dtype] = None,
              backend: str = "auto") -> "Mapping[str, Tensor]":
        """New weights: every predicted module merged with the fused kernel (fp32 math, one
        rounding), every other tensor passed through. ``dtype=None`` keeps each tensor's
        dtype; ``dtype=torch.float32`` returns every floating tensor in float32, as
        AlphaRL's reference code writes its predicted model (a bf16 rounding would drop
        the parts of the update below half a bf16 ulp of the weight). Lazy: each tensor is
        read and merged when it is accessed, so a model is never held whole."""
        missing = [k for k in self.factors if k not in weights]
        if missing:
            raise KeyError(f"the weights lack predicted modules: {missing[:5]}")

        def cast(W):
            return W.to(dtype) if dtype is not None and W.is_floating_point() and W.dtype != dtype else W

        def merged(name):
            W, f = weights[name], self.factors[name]
            dev = W.device
            if dtype is not None and W.dtype != dtype:  # merge into the upcast copy, in place
                W = W.to(dtype)
                return ops.merge_lowrank(W, f.U.to(dev), f.S.to(dev), f.V.to(dev), f.alpha, out=W, backend=backend)
            return ops.merge_lowrank(W, f.U.to(dev), f.S.to(dev), f.V.to(dev), f.alpha, backend=backend)

        return Overlay(weights, self.factors, merged, other=cast if dtype is not None else None)

    def save(self, path: str) -> None:
        """A directory: prediction.json plus factors.safetensors (no pickle)."""
        from safetensors.torch import save_file

        tensors = {}
        for name, f in self.factors.items():
            for part in ("U", "S", "V"):
                tensors[f"{name}::{part}"] = getattr(f, part).contiguous()
        meta = {"applies_to": self.applies_to, "info": self.info,
                "alpha": {n: f.alpha for n, f in self.factors.items()}}
        from .io.writers import atomic_dir, write_json

        atomic_dir(path, lambda d: (save_file(tensors, os.path.join(d, "factors.safetensors")),
                                    write_json(os.path.join(d, "prediction.json"), meta)))

    @classmethod
    def load(cls, path: str) -> "Prediction":
        from safetensors.torch import load_file

        from .io.readers import read_json

        meta = read_json(os.path.join(path, "prediction.json"))
        tensors = load_file(os.path.join(path, "factors.safetensors"))
        factors = {n: Factors(tensors[f"{n}::U"], tensors[f"{n}::S"], tensors[f"{n}::V"], float(a))
                   for n, a in meta["alpha"].items()}
        applies = meta["applies_to"]
        if isinstance(applies, str):  # written before 0.2: "initial" or "step N"
            applies = None if applies == "initial" else float(applies.split()[1])
        return cls(factors, applies, meta.get("info", {}))


class Overlay(Mapping):
    """A lazy view of ``source`` in which the tensors named in ``names`` are computed by
    ``fn(name)`` when accessed; every other tensor passes through (through ``other(tensor)``
    when given). Iteration, length and membership come from ``source`` (membership never
    triggers a computation)."""

    def __init__(self, source: Mapping, names, fn, other=None):
        self._src, self._names, self._fn, self._other = source, set(names), fn, other

    def __getitem__(self, name):
        if name in self._names:
            return self._fn(name)
        t = self._src[name]
        return t if self._other is None else self._other(t)

    def __contains__(self, name):
        return name in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    def __len__(self):
        return len(self._src)


def rank_k_reconstruction(W0: Tensor, Wt: Tensor, k: int = 1, scale: float = 1.0, norm_match: bool = True,
                          *, tol: float = 1e-4, backend: str = "auto") -> Tensor:
    """W₀ + λ·α·U_k·S_k·V_kᵀ with the top-k triplets of ΔW = Wt − W₀ (docs/METHODS.md §1).

    α = ‖ΔW‖_F / ‖S_k‖₂ when ``norm_match`` (so the update keeps ΔW's Frobenius norm),
    else 1; λ = ``scale``. Returned in W₀'s dtype, rounded once.
    """
    res = svd_lowrank(Wt, k, base=W0, tol=tol, backend=backend, fro=norm_match)
    alpha = 1.0
    if norm_match:
        sk = float(res.S.double().norm())
        alpha = res.fro / sk if sk > 0 else 0.0
    return ops.merge_lowrank(W0, res.U, res.S, res.V, scale * alpha, backend=backend)


# ------------------------------------------------------------------ temporal (RELEX)


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
    """W₀ + Σ_t β_t·ΔW_t for one tensor (fp32 math, one rounding)."""
    W0 = base[name]
    Ws = [ck[name] for ck in cks]
    for s, W in zip(steps, Ws):
        if W.shape != W0.shape or W.dtype != W0.dtype:
            raise ValueError(f"{name} at step {s:g}: shape {tuple(W.shape)} {W.dtype}, base "
                             f"has {tuple(W0.shape)} {W0.dtype}")
    G = ops.delta_gram(Ws, W0, backend=backend)
    beta = temporal_coefficients(G, steps, to_step)
    cd = ops.compute_dtype(W0.dtype)
    out = W0.to(cd, copy=True)
    for bt, W in zip(beta.tolist(), Ws):
        out.add_(W.to(cd) - W0.to(cd), alpha=bt)
    return out.to(W0.dtype)
