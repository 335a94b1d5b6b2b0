"""pyrank's primitives, and the one place where backends are chosen.

Everything above this module (the SVD, the tracker, the tools) calls only these
functions. Each checks its inputs once, picks a backend, and hands the backend
tensors it may trust:

* ``delta_mm(A, B, X)``        = (A − B) @ X                           m×k
* ``delta_mm_t(A, B, Y)``      = (A − B)ᵀ @ Y                          n×k
* ``delta_mm_both(A, B, X, Y)`` = both, in a single read of A and B
* ``delta_sqnorm(A, B)``       = ‖A − B‖_F²                            0-d tensor
* with ``nnz=True`` the products also return #{A − B ≠ 0} (entries that differ as numbers)
  from the same read — the update's changed count, which costs no pass of its own
* ``merge_lowrank(W, U, S, V, alpha, out)`` = W + α·U·diag(S)·Vᵀ, fp32 math, one
  rounding to W's dtype
* ``delta_gram(As, B)``        = G_ij = ⟨A_i − B, A_j − B⟩ for a list of weights   T×T

A and B are 2-D weights of one shape, dtype (bfloat16, float16, float32 or float64)
and device, with any strides; B may be None (then A alone). The small operands
(X, Y, U, S, V) are cast to the compute dtype — float32, or float64 for float64
weights — and results come back in it. A − B is never materialized.

Backends and their contract: :mod:`pyrank.backends` (``"torch"``, the reference, any
device; ``"cpu"``, pyrank._C; ``"triton"``, pyrank.triton_kernels). ``"auto"`` — or the
``PYRANK_BACKEND`` environment variable when set — picks triton for CUDA tensors, cpu for
CPU tensors when the extension is built, and torch otherwise. float64 weights are computed
by the reference, in float64, whatever the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import (BACKENDS, BackendUnavailable, compute_dtype, for_weights, resolve, status)
from .backends import _loaded, row_blocks  # noqa: F401  (re-exported: the tools' row blocks, tests' stubs)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "backend_status",
    "resolve_backend",
    "delta_mm",
    "delta_mm_t",
    "delta_mm_both",
    "delta_sqnorm",
    "merge_lowrank",
    "delta_gram",
]

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def resolve_backend(backend: str, device: torch.device):
    """(name, backend module) for ``backend`` ("auto" or a name) on ``device``."""
    return resolve(backend, device)


def backend_status() -> dict:
    """``{name: None if usable else reason}`` for every backend (what ``pyrank env`` prints)."""
    return status()


def _backend(backend: str, A: Tensor):
    """The module that computes on weights like A: the chosen backend, or the reference for
    float64 weights (:func:`pyrank.backends.for_weights`)."""
    return for_weights(resolve(backend, A.device)[1], A.dtype)


# ---------------------------------------------------------------- validation


def check_weights(A: Tensor, B: Optional[Tensor], names=("A", "B")) -> None:
    """Validate a weight pair (B may be None). Errors name the offending tensor."""
    na, nb = names
    if not isinstance(A, Tensor):
        raise TypeError(f"{na} must be a torch.Tensor, got {type(A).__name__}")
    if A.layout != torch.strided:
        raise TypeError(f"{na} is a {A.layout} tensor; pyrank's kernels read dense (strided) weights: "
                        f"pass {na}.to_dense()")
    if A.device.type == "meta":
        raise ValueError(f"{na} is on the meta device (no data to read); materialize it first")
    if A.dim() != 2:
        raise ValueError(f"{na} must be 2-D, got shape {tuple(A.shape)}")
    if A.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{na} has dtype {A.dtype}; supported: bfloat16, float16, float32, float64")
    if B is None:
        return
    if not isinstance(B, Tensor):
        raise TypeError(f"{nb} must be a torch.Tensor or None, got {type(B).__name__}")
    if B.layout != torch.strided:
        raise TypeError(f"{nb} is a {B.layout} tensor; pyrank's kernels read dense (strided) weights: "
                        f"pass {nb}.to_dense()")
    if B.shape != A.shape:
        raise ValueError(f"{nb} has shape {tuple(B.shape)} but {na} has {tuple(A.shape)}")
    if B.dtype != A.dtype:
        raise TypeError(f"{nb} has dtype {B.dtype} but {na} has {A.dtype}; they must match")
    if B.device != A.device:
        raise ValueError(f"{nb} is on {B.device} but {na} is on {A.device}")


def _factor(X: Tensor, name: str, rows: int, A: Tensor, ndim: int = 2) -> Tensor:
    """Validate a small operand and cast it to the compute dtype of A."""
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() != ndim or X.shape[0] != rows:
        want = f"({rows}, k)" if ndim == 2 else f"({rows},)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(X.shape)}")
    if not (X.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got {X.dtype}")
    if X.device != A.device:
        raise ValueError(f"{name} is on {X.device} but the weights are on {A.device}")
    return X.to(compute_dtype(A.dtype))


# ---------------------------------------------------------------- primitives


def _with(out, sq, nz, sqnorm, nnz):
    """The product(s), then ‖Δ‖_F² and #{Δ ≠ 0} as asked."""
    return (*out, *((sq,) if sqnorm else ()), *((nz,) if nnz else ()))


def delta_mm(A: Tensor, B: Optional[Tensor], X: Tensor, *, sqnorm: bool = False, nnz: bool = False,
             backend: str = "auto"):
    """(A − B) @ X.  A, B: (m, n) weights; X: (n, k).  Returns (m, k) in the compute dtype;
    with ``sqnorm=True``, also ‖A − B‖_F², with ``nnz=True`` the int number of entries with
    A ≠ B, from the same read: ``(product, sqnorm, nnz)`` (those asked for)."""
    check_weights(A, B)
    X = _factor(X, "X", A.shape[1], A)
    ox, _, sq, nz = _backend(backend, A).delta_products(A, B, X, None, compute_dtype(A.dtype), sqnorm or nnz)
    return _with((ox,), sq, nz, sqnorm, nnz) if sqnorm or nnz else ox


def delta_mm_t(A: Tensor, B: Optional[Tensor], Y: Tensor, *, sqnorm: bool = False, nnz: bool = False,
               backend: str = "auto"):
    """(A − B)ᵀ @ Y without a transposed copy.  Y: (m, k).  Returns (n, k) (and ‖A − B‖_F²,
    #{A ≠ B} as :func:`delta_mm`)."""
    check_weights(A, B)
    Y = _factor(Y, "Y", A.shape[0], A)
    _, oy, sq, nz = _backend(backend, A).delta_products(A, B, None, Y, compute_dtype(A.dtype), sqnorm or nnz)
    return _with((oy,), sq, nz, sqnorm, nnz) if sqnorm or nnz else oy


def delta_mm_both(A: Tensor, B: Optional[Tensor], X: Tensor, Y: Tensor, *, sqnorm: bool = False,
                  nnz: bool = False, backend: str = "auto"):
    """((A − B) @ X, (A − B)ᵀ @ Y) in one read of A and B.  X: (n, kx); Y: (m, ky).
    With ``sqnorm=True`` ‖A − B‖_F², with ``nnz=True`` #{A ≠ B}, from the same read."""
    check_weights(A, B)
    X = _factor(X, "X", A.shape[1], A)
    Y = _factor(Y, "Y", A.shape[0], A)
    ox, oy, sq, nz = _backend(backend, A).delta_products(A, B, X, Y, compute_dtype(A.dtype), sqnorm or nnz)
    return _with((ox, oy), sq, nz, sqnorm, nnz)


def delta_sqnorm(A: Tensor, B: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """‖A − B‖_F² as a 0-d tensor in the compute dtype (sums in float64)."""
    check_weights(A, B)
    return _backend(backend, A).delta_products(A, B, None, None, compute_dtype(A.dtype), True)[2]


def merge_lowrank(
    W: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    alpha: float = 1.0,
    out: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """W + alpha·U·diag(S)·Vᵀ, computed in fp32 (fp64 for fp64 W), rounded once to W's dtype.

    W: (m, n); U: (m, k); S: (k,); V: (n, k).  ``out=None`` allocates the result;
    ``out is W`` updates W in place; any other ``out`` must be a separate tensor of W's
    shape, dtype and device (it may not overlap W).
    """
    check_weights(W, None, names=("W", None))
    m, n = W.shape
    U = _factor(U, "U", m, W)
    V = _factor(V, "V", n, W)
    S = _factor(S, "S", U.shape[1], W, ndim=1)
    if V.shape[1] != U.shape[1]:
        raise ValueError(f"U has {U.shape[1]} columns but V has {V.shape[1]}")
    if out is None:
        out = torch.empty_like(W)
    elif out is not W:
        check_weights(W, out, names=("W", "out"))
        same_memory = out.data_ptr() == W.data_ptr() and out.stride() == W.stride()
        if not same_memory and _overlaps(out, W):
            raise ValueError("out overlaps W without being W itself; pass out=W for in place")
    return _backend(backend, W).merge_lowrank(W, U, S, V, float(alpha), out, compute_dtype(W.dtype))


def delta_gram(As, B: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Gram matrix of deltas: G[i, j] = ⟨As[i] − B, As[j] − B⟩ (Frobenius inner products).

    As: a sequence of T weights, each of B's shape, dtype and device. Returns a (T, T)
    float64 tensor on that device, exactly symmetric; products in the compute dtype, sums
    in float64.
    """
    As = list(As)
    if not As:
        raise ValueError("delta_gram needs at least one weight")
    ref, ref_name = (B, "B") if B is not None else (As[0], "As[0]")
    check_weights(ref, None, names=(ref_name, None))
    for i, A in enumerate(As):
        check_weights(ref, A, names=(ref_name, f"As[{i}]"))
    G = _backend(backend, As[0]).delta_gram(As, B, compute_dtype(As[0].dtype))
    # Symmetric by construction: the upper triangle, mirrored. A backend's two triangles
    # may differ in the last bit (D·Dᵀ's two halves are summed in different orders by
    # some BLAS builds), and callers (eigh, tests) rely on exact symmetry.
    return G.triu() + G.triu(1).T


def _overlaps(a: Tensor, b: Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    def span(t):
        lo = t.data_ptr()
        hi = lo + t.element_size() * (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())))
        return lo, hi
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1
