"""The C++ CPU backend: pyrank._C (built from csrc/), called with pointers, shapes and strides.

Tensors arrive validated by :mod:`pyrank.ops` (the contract: :mod:`pyrank.backends`;
float64 weights never come here). This module only arranges layouts:
the kernels stream rows, so a pair whose rows are contiguous runs as is; a pair of
column-major tensors (e.g. ``W.T`` views) runs as the transposed problem on row-major
views — ΔX = (Δᵀ)ᵀX and ΔᵀY = (Δᵀ)Y swap roles — and anything else is gathered
element by element (correct, slower). Threads: :func:`pyrank.backends.kernel_threads`.
"""
from __future__ import annotations

import torch

from . import kernel_threads

try:
    from .. import _C
except ImportError as exc:  # built with PYRANK_SKIP_CPP=1, or no compiler at install time
    _C = None
    _IMPORT_ERROR = str(exc)

_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def unavailable_reason():
    if _C is None:
        return (f"pyrank._C is not built ({_IMPORT_ERROR}); reinstall with a C++17 compiler "
                "and without PYRANK_SKIP_CPP=1: pip install -e .")
    return None


def supports_device(device):
    return device.type == "cpu"


def device_hint():
    return "the cpu backend takes CPU tensors; use backend='triton' or 'torch' for CUDA tensors"


def _colmajor(T):
    return T is None or (T.stride(0) == 1 and T.stride(1) != 1) or T.shape[1] == 1


def _rowmajor(T):
    return T is None or T.stride(1) == 1 or T.shape[1] == 1


def _transposed(A, B) -> bool:
    """Run on Aᵀ, Bᵀ? Only when that turns both into row-streamable views."""
    return not (_rowmajor(A) and _rowmajor(B)) and _colmajor(A) and _colmajor(B)


def _mat(T):
    if T is None:
        return 0, 0, 0
    return T.data_ptr(), T.stride(0), T.stride(1)


def delta_products(A, B, X, Y, cdtype, sqnorm):
    """(ΔX or None, ΔᵀY or None, ‖Δ‖_F² and #{Δ ≠ 0} or None, None) for fp32 X (n×kx),
    Y (m×ky): one read."""
    if _transposed(A, B):  # ΔX = (Δᵀ)ᵀX, ΔᵀY = (Δᵀ)Y, ‖Δ‖ = ‖Δᵀ‖
        Q, P, sq, nz = delta_products(A.t(), None if B is None else B.t(), Y, X, cdtype, sqnorm)
        return P, Q, sq, nz
    m, n = A.shape
    kx = 0 if X is None else X.shape[1]
    ky = 0 if Y is None else Y.shape[1]
    out_x = torch.empty(m, kx, dtype=torch.float32) if X is not None else None
    out_y = torch.empty(n, ky, dtype=torch.float32) if Y is not None else None
    if m == 0 or n == 0:  # nothing to read: every output is zero
        return (None if out_x is None else out_x.zero_(), None if out_y is None else out_y.zero_(),
                torch.zeros((), dtype=cdtype) if sqnorm else None, 0 if sqnorm else None)
    # X and Y as they are: the kernel reads any strides (transposing copies on the way in and
    # out cost ~10 ms around a 72-column pass over 4096×11008 on the Intel VM: docs/DESIGN.md)
    sq, nz = _C.delta_products(
        _DTYPE_CODE[A.dtype], m, n, *_mat(A), *_mat(B), *_mat(X), kx,
        0 if out_x is None else out_x.data_ptr(), kx, *_mat(Y), ky,
        0 if out_y is None else out_y.data_ptr(), ky, bool(sqnorm), kernel_threads(),
    )
    return (out_x, out_y, torch.tensor(sq, dtype=cdtype) if sqnorm else None, nz if sqnorm else None)


def merge_lowrank(W, U, S, V, alpha, out, cdtype):
    Wk, ok, left, right = W, out, U * (alpha * S), V
    if _transposed(W, None) and _transposed(out, None):
        # (W + L Rᵀ)ᵀ = Wᵀ + R Lᵀ: write the transposed problem row by row
        Wk, ok, left, right = W.t(), out.t(), right * (alpha * S), U
    m, n = Wk.shape
    if m and n:
        LS = left.contiguous()
        RT = right.t().contiguous()
        _C.merge_lowrank(_DTYPE_CODE[W.dtype], m, n, *_mat(Wk), ok.data_ptr(), ok.stride(0),
                         ok.stride(1), LS.data_ptr(), RT.data_ptr(), LS.shape[1],
                         kernel_threads())
    return out


def delta_gram(As, B, cdtype):
    m, n = As[0].shape
    G = torch.zeros(len(As), len(As), dtype=torch.float64)
    if m and n:
        mats = [_mat(A) for A in As]
        _C.delta_gram(_DTYPE_CODE[As[0].dtype], m, n, [p for p, _, _ in mats], [s0 for _, s0, _ in mats],
                      [s1 for _, _, s1 in mats], *_mat(B), G.data_ptr(), kernel_threads())
    return G
