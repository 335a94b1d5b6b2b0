"""Fits on rank-1 trajectories (docs/METHODS.md §1): is û(t) linear in the step, and
AlphaRL's PLS regression of a metric on it.

* :func:`line_fit`, :func:`r2_in_step` — least squares in the step, every coordinate, R²
  in sample;
* :class:`PLS1` — standardize each column of X (T×m), one-component PLS to y, ordinary
  least squares y = a·z + b on the score; and its inversion at a target metric.

All fits run in float64 on the CPU: they are small (T × m) and precision is cheap there.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["r2_in_step", "line_fit", "PLS1"]


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
