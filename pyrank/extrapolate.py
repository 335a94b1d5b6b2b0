"""Predicted low-rank updates and the rank-k dominance model (docs/METHODS.md §1).

* :class:`Prediction` — predicted low-rank updates per module (:class:`Factors`), small
  enough to save, applied to weights tensor by tensor with the fused ``merge_lowrank``;
* :class:`Overlay` — a lazy mapping that computes some tensors and passes the rest through;
* :func:`rank_k_reconstruction` — W₀ + λ·α·U_k S_k V_kᵀ.

The fits behind a prediction are in :mod:`pyrank.fits`, RELEX's temporal mode in
:mod:`pyrank.temporal`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor

from . import ops
from .linalg import svd_lowrank

__all__ = ["Factors", "Prediction", "Overlay", "rank_k_reconstruction"]


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
