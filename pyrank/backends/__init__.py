"""pyrank's backends: the contract every one of them implements, and choosing one.

A backend is a module with the functions of :class:`Backend` below. They receive tensors
:mod:`pyrank.ops` has already checked: A and B (B may be None) 2-D, dense, of one shape,
dtype (bfloat16, float16 or float32 — float64 weights always go to the reference, see
:func:`for_weights`) and device; the small operands (X, Y, U, S, V) in the compute dtype on
that device. Backends:

* ``reference`` — plain PyTorch on any device, A − B formed one block of rows at a time
  (:func:`row_blocks`); the oracle every test compares with. Public name ``"torch"``.
* ``cpu`` — the C++ kernels of ``csrc/`` (``pyrank._C``): CPU tensors.
* ``triton`` — the Triton kernels of ``triton_kernels/`` (``pyrank.triton_kernels``): CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

``"auto"`` (or ``PYRANK_BACKEND``) picks triton for CUDA tensors, cpu for CPU tensors when
the extension is built, and the reference otherwise. A backend that cannot run raises
:class:`BackendUnavailable` saying why, when it is asked for — never at import.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional, Protocol, Tuple

import torch
from torch import Tensor

__all__ = ["Backend", "BACKENDS", "BackendUnavailable", "load", "status", "resolve", "for_weights",
           "row_blocks", "compute_dtype", "ROW_BLOCK_ELEMS", "kernel_threads", "serial_small_ops"]


class Backend(Protocol):
    """The contract. ``cdtype`` is the compute dtype (:func:`compute_dtype` of the weights')."""

    def delta_products(self, A: Tensor, B: Optional[Tensor], X: Optional[Tensor], Y: Optional[Tensor],
                       cdtype: torch.dtype, sqnorm: bool
                       ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[int]]:
        """((A − B)·X or None, (A − B)ᵀ·Y or None, ‖A − B‖_F² as a 0-d tensor or None, the
        number of entries with A − B ≠ 0 in ``cdtype`` (A ≠ B as numbers) or None), from one
        read of A and B: X (n, kx) and Y (m, ky) may each be None, ``sqnorm`` asks for the
        norm and the count. Outputs in ``cdtype``."""

    def merge_lowrank(self, W: Tensor, U: Tensor, S: Tensor, V: Tensor, alpha: float, out: Tensor,
                      cdtype: torch.dtype) -> Tensor:
        """out = W + alpha·U·diag(S)·Vᵀ, in ``cdtype`` math with one rounding to W's dtype;
        ``out`` is W itself (in place) or a separate tensor like it."""

    def delta_gram(self, As, B: Optional[Tensor], cdtype: torch.dtype) -> Tensor:
        """(T, T) float64 Gram matrix ⟨A_i − B, A_j − B⟩; its upper triangle must be right
        (ops mirrors it)."""

    # optional: unavailable_reason() -> str | None, supports_device(device) -> bool, device_hint() -> str


BACKENDS = ("torch", "cpu", "triton")  # public names
_MODULES = {"torch": "pyrank.backends.reference", "cpu": "pyrank.backends.cpu", "triton": "pyrank.backends.triton"}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


_loaded: dict = {}  # name -> (module or None, reason it cannot run or None)


def load(name: str):
    """The backend module ``name``; BackendUnavailable with the reason if it cannot run."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            reason = mod.unavailable_reason() if hasattr(mod, "unavailable_reason") else None
        except ImportError as exc:  # an optional dependency is missing
            mod, reason = None, f"import failed: {exc}"
        _loaded[name] = (mod, reason)
    mod, reason = _loaded[name]
    if reason is not None:
        raise BackendUnavailable(f"pyrank backend {name!r} is unavailable: {reason}")
    return mod


def status() -> dict:
    """``{name: None if usable else reason}`` for every backend (what ``pyrank env`` prints)."""
    out = {}
    for name in BACKENDS:
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc).split(": ", 1)[1]
    return out


def _available(name: str) -> bool:
    try:
        load(name)
        return True
    except BackendUnavailable:
        return False


def resolve(backend: str, device: torch.device):
    """Map ``backend`` ("auto" or a name) and a device to (name, backend module)."""
    if backend == "auto":
        backend = os.environ.get("PYRANK_BACKEND", "auto") or "auto"
    if backend == "auto":
        if device.type == "cuda" and _available("triton"):
            backend = "triton"
        elif device.type == "cpu" and _available("cpu"):
            backend = "cpu"
        else:
            backend = "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    mod = load(backend)
    if hasattr(mod, "supports_device") and not mod.supports_device(device):
        raise BackendUnavailable(
            f"pyrank backend {backend!r} cannot run on {device.type} tensors: {mod.device_hint()}"
        )
    return backend, mod


def for_weights(mod, dtype: torch.dtype):
    """The module that computes weights of ``dtype``: float64 weights are computed in float64
    by the reference on their own device whatever the backend (the native kernels are float32
    accumulators) — the one place that rule lives."""
    return load("torch") if dtype == torch.float64 else mod


# ---------------------------------------------------------------- threads

_kernel_threads: Optional[int] = None  # set by serial_small_ops(): the kernels' thread count


def kernel_threads() -> int:
    """Threads the CPU kernels use: ``torch.get_num_threads()``, or, inside
    :func:`serial_small_ops`, the count torch had when it was entered."""
    return _kernel_threads or torch.get_num_threads()


@contextlib.contextmanager
def serial_small_ops():
    """Run torch's own CPU ops on one thread and the kernels on the threads torch had.

    For loops of many small solves (the series: top-1 of every module at every checkpoint)
    whose reads overlap the compute on a background thread. The solver's small-matrix ops
    (QR and SVD of a few columns, products with the bases) take microseconds of work, and a
    two-thread team for them waits on whichever thread the file reads have just taken:
    measured in one Qwen2.5-7B-shaped layer (2 cores, AMD EPYC, reads overlapped), 114 QRs
    took 0.43 s on torch's two threads and 0.014 s on one, the solver's work outside the
    kernels ~0.9 s and ~0.2 s. The kernels, bandwidth-bound passes over whole weights, keep
    every thread. torch's thread count is process-wide, so this is for loops pyrank owns
    (the CLI's series loop), not for library calls; it is restored on exit.
    """
    global _kernel_threads
    saved, outer = torch.get_num_threads(), _kernel_threads
    _kernel_threads = outer or saved
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        _kernel_threads = outer


# ---------------------------------------------------------------- shared helpers

ROW_BLOCK_ELEMS = 1 << 22  # 4 Mi elements = 16 MiB of fp32 per block of rows


def row_blocks(m: int, n: int):
    """(start, stop) ranges of rows of an m×n matrix, ~ROW_BLOCK_ELEMS elements each: the
    chunking of every computation that forms A − B (or a reconstruction) a block at a time."""
    rows = max(1, ROW_BLOCK_ELEMS // max(n, 1))
    for i in range(0, m, rows):
        yield i, min(m, i + rows)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 weights are computed in float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
