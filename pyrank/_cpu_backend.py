"""The C++ CPU backend (pyrank._C)."""
from __future__ import annotations

try:
    from . import _C
except ImportError as exc:  # built with PYRANK_SKIP_CPP=1, or no compiler at install time
    _C = None
    _IMPORT_ERROR = str(exc)


def unavailable_reason():
    if _C is None:
        return (f"pyrank._C is not built ({_IMPORT_ERROR}); reinstall with a C++17 compiler "
                "and without PYRANK_SKIP_CPP=1: pip install -e .")
    if not getattr(_C, "has_kernels", False):
        return "pyrank._C is built but its kernels are not implemented yet"
    return None


def supports_device(device):
    return device.type == "cpu"


def device_hint():
    return "the cpu backend takes CPU tensors; use backend='triton' or 'torch' for CUDA tensors"
