"""The Triton backend: pyrank.triton_kernels (built from triton_kernels/) on CUDA tensors.

CPU tensors are accepted only under TRITON_INTERPRET=1 (the test suite's way of running
the kernels without a GPU). Merges of rank above the kernel's limit are computed by the
reference on the same device. The contract: :mod:`pyrank.backends` (float64 weights never
come here).
"""
from __future__ import annotations

import os

import torch

from . import reference

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except ImportError as exc:
    _TRITON_ERROR = str(exc)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason():
    if _TRITON_ERROR is not None:
        return f"triton is not installed ({_TRITON_ERROR}); pip install 'pyrank[triton]'"
    if not torch.cuda.is_available() and not _interpret():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None


def supports_device(device):
    return device.type == "cuda" or (device.type == "cpu" and _interpret())


def device_hint():
    return "the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"


def _k():
    from ..triton_kernels import delta, merge  # imports triton: only once the backend is used

    return delta, merge


def delta_products(A, B, X, Y, cdtype, sqnorm):
    return _k()[0].delta_products(A, B, X, Y, sqnorm)


def merge_lowrank(W, U, S, V, alpha, out, cdtype):
    _, merge = _k()
    if U.shape[1] > merge.MAX_K:
        return reference.merge_lowrank(W, U, S, V, alpha, out, cdtype)
    return merge.merge_lowrank(W, U * (alpha * S), V, out)


def delta_gram(As, B, cdtype):
    return _k()[0].delta_gram(As, B)
