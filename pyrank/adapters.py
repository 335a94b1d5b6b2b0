"""SVD-initialized LoRA adapters (docs/METHODS.md §4), with peft's conventions.

With scaling s = lora_alpha / r and r singular triplets (U_r, S_r, V_r) of W:
S' = S_r / s, B = U_r·diag(√S'), A = diag(√S')·V_rᵀ, W_res = W − s·B·A (= W − U_r S_r V_rᵀ).
A is (r, in_features) = (r, n) and B is (out_features, r) = (m, r), as peft's lora_A and
lora_B weights; A, B and W_res come back in W's dtype (W_res rounded once, by the fused
merge kernel).

* :func:`pissa_init` — the top r triplets (pyrank's randomized SVD, to ``tol``).
* :func:`milora_init` — the bottom r triplets, by an exact method: the eigendecomposition
  of the smaller Gram matrix in float64 (randomized range finders cannot find minor
  components).

* :func:`init_peft_model` — either init for every LoRA layer of a peft model, in place
  (``peft`` is an optional extra: ``pip install 'pyrank[peft]'``).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .linalg import svd_lowrank

__all__ = ["pissa_init", "milora_init", "init_peft_model"]


def _check(W: Tensor, r: int, lora_alpha: float):
    ops.check_weights(W, None, names=("W", None))
    if not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be an int in [1, min(W.shape) = {min(W.shape)}], got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")


def _adapter_factors(W, U, S, V, s):
    """A (r, n) and B (m, r) in W's dtype for scaling s: S' = S/s, B = U·√S', A = √S'·Vᵀ."""
    root = torch.sqrt(S.double() / s)
    B = (U.double() * root).to(W.dtype)
    A = (root[:, None] * V.double().T).to(W.dtype)
    return A, B


def _factors(W, U, S, V, s, backend):
    """A, B, W_res for scaling s (peft's: lora_alpha / r, or lora_alpha / √r with rsLoRA)."""
    A, B = _adapter_factors(W, U, S, V, s)
    W_res = ops.merge_lowrank(W, U, S, V, alpha=-1.0, backend=backend)  # W − U S Vᵀ, one rounding
    return A, B, W_res


# PiSSA's default SVD tolerance: the loosest that keeps the top-r part more accurate than
# peft's fast path (pissa_niter_4 = torch.svd_lowrank(W, r, niter=4)) while initializing a
# whole model at least as fast (benchmarks/bench_adapters.py).
PISSA_TOL = 1e-2


def pissa_init(W: Tensor, r: int, lora_alpha: float, *, tol: float = PISSA_TOL,
               backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """PiSSA: (A, B, W_res) from the top-r singular triplets of W, to residuals ≤ ``tol``·σ₁
    (default ``PISSA_TOL``; pass e.g. 1e-6 for triplets accurate to float32)."""
    _check(W, r, lora_alpha)
    return _factors(W, *_triplets(W, r, "pissa", tol, backend), lora_alpha / r, backend)


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
    return _factors(W, *_triplets(W, r, "milora", None, backend), lora_alpha / r, backend)


def _triplets(W, r, method, tol, backend):
    """(U, S, V) in W's compute dtype: the top r (PiSSA, pyrank's SVD to ``tol``) or the
    bottom r (MiLoRA, exact)."""
    if method == "pissa":
        res = svd_lowrank(W, r, tol=tol, backend=backend)
        return res.U, res.S, res.V
    cd = ops.compute_dtype(W.dtype)
    return tuple(t.to(cd) for t in smallest_triplets(W, r))


def init_peft_model(model, method: str = "pissa", *, adapter_name: Optional[str] = None,
                    tol: float = PISSA_TOL, backend: str = "auto",
                    initial_dir: Optional[str] = None) -> Dict[str, dict]:
    """Fill every LoRA layer of a peft model with PiSSA or MiLoRA factors, in place.

    For each ``peft`` LoRA layer wrapping a Linear (or GPT-2's Conv1D, ``fan_in_fan_out``):
    lora_A and lora_B get A and B (in their own dtype) and the base weight becomes W_res
    (in its dtype, rounded once), with the layer's own scaling (``lora_alpha / r``, or
    ``lora_alpha / √r`` with rsLoRA) and rank — what peft's ``init_lora_weights="pissa"``
    does, with pyrank's SVD instead of a full ``torch.linalg.svd``.

    All or nothing: every layer is checked and every SVD computed before the model is
    touched, so an error (a bad layer, a NaN weight, ...) leaves the model unchanged.

    Saving: the base weights now hold W_res, so a plain ``save_pretrained`` of the adapter
    reloads correctly only onto these residual weights. To get an adapter for the
    *original* model, do as peft does for its own PiSSA: pass ``initial_dir`` here (the
    initial adapter is saved there, marked ``init_lora_weights=True``), train, then
    ``model.save_pretrained(out, path_initial_model_for_weight_conversion=initial_dir)``,
    which writes a plain LoRA of rank 2r (A' = [A; A₀], B' = [B, −B₀]) that
    ``PeftModel.from_pretrained(original_model, out)`` loads exactly. Without
    ``initial_dir`` a warning says so.

    Args:
        model: a ``peft.PeftModel`` (or a model with peft LoRA layers injected).
        method: "pissa" (top-r triplets) or "milora" (bottom-r, exact).
        adapter_name: the adapter to fill (default: every adapter of each layer).
        tol: PiSSA's SVD tolerance (default ``PISSA_TOL``, see :func:`pissa_init`).
        initial_dir: where to save the initial adapter for peft's conversion on save; its
            last path component becomes the adapter's name when peft reloads it.
    Returns {module name: {"adapter", "r", "scaling", "shape"}} for every layer filled.
    Raises ImportError when peft is not installed, ValueError when the model has no LoRA
    layer or a LoRA layer wraps something other than a Linear.
    """
    if method not in ("pissa", "milora"):
        raise ValueError(f"method must be 'pissa' or 'milora', got {method!r}")
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:
        raise ImportError("init_peft_model needs peft: pip install 'pyrank[peft]'") from exc
    # ---- 1. check every layer and compute every SVD; nothing in the model changes here
    plan = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        W_param = getattr(base, "weight", None)
        if W_param is None or W_param.dim() != 2 or (type(base).__name__ not in ("Linear", "Conv1D")):
            raise ValueError(f"{name}: init_peft_model fills LoRA layers on Linear/Conv1D weights; "
                             f"this one wraps {type(base).__name__}")
        fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        for adapter in list(layer.lora_A):
            if adapter_name is not None and adapter != adapter_name:
                continue
            r, s = int(layer.r[adapter]), float(layer.scaling[adapter])
            with torch.no_grad():
                W = W_param.data.T if fan_in_fan_out else W_param.data
                try:
                    _check(W, r, s)
                    U, S, V = _triplets(W, r, method, tol, backend)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
            plan.append((name, layer, adapter, W, r, s, U, S, V))
    if not plan:
        raise ValueError("the model has no peft LoRA layer" + (f" with adapter {adapter_name!r}" if adapter_name else ""))
    if initial_dir is not None and not (hasattr(model, "save_pretrained") and hasattr(model, "peft_config")):
        raise ValueError("initial_dir needs a peft.PeftModel (it saves the initial adapter with save_pretrained)")
    # ---- 2. write: validated shapes and dtypes only, W_res merged in place (no allocation)
    done = {}
    with torch.no_grad():
        for name, layer, adapter, W, r, s, U, S, V in plan:
            A, B = _adapter_factors(W, U, S, V, s)
            layer.lora_A[adapter].weight.data.copy_(A)
            layer.lora_B[adapter].weight.data.copy_(B)
            ops.merge_lowrank(W, U, S, V, alpha=-1.0, out=W, backend=backend)  # W − U S Vᵀ, in place
            done[name] = {"adapter": adapter, "r": r, "scaling": s, "shape": list(W.shape)}
    _mark_config(model, {p[2] for p in plan}, method)
    if initial_dir is not None:
        _save_initial(model, initial_dir, adapter_name)
    else:
        warnings.warn(
            "pyrank.adapters.init_peft_model: the base weights now hold W_res. A plain "
            "save_pretrained() of this adapter reloads correctly only onto these residual weights; "
            "for an adapter that loads on the original model pass initial_dir=DIR here and "
            "path_initial_model_for_weight_conversion=DIR to save_pretrained (see the docstring).",
            UserWarning, stacklevel=2)
    return done


def _mark_config(model, adapters, method):
    """What a plain save records: "pissa" for PiSSA (peft's own value, so a reload on the
    original model recomputes peft's PiSSA: right to the SVDs' accuracy, never the principal
    part twice); True for MiLoRA, which peft cannot recompute."""
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict):
        return
    for a in adapters:
        if a in cfgs and hasattr(cfgs[a], "init_lora_weights"):
            cfgs[a].init_lora_weights = "pissa" if method == "pissa" else True


def _save_initial(model, initial_dir, adapter_name):
    """Save the just-initialized adapter(s) as peft's conversion on save expects them: with
    ``init_lora_weights=True`` (so reloading them does not decompose again), atomically."""
    from .io.writers import atomic_dir

    names = [adapter_name] if adapter_name is not None else list(model.peft_config)
    saved = {a: model.peft_config[a].init_lora_weights for a in names}
    try:
        for a in names:
            model.peft_config[a].init_lora_weights = True
        atomic_dir(initial_dir, lambda d: model.save_pretrained(d, selected_adapters=names))
    finally:
        for a, v in saved.items():
            model.peft_config[a].init_lora_weights = v
