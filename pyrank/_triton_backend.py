"""The Triton backend (pyrank.triton_kernels)."""
from __future__ import annotations


def unavailable_reason():
    return "the Triton kernels are not implemented yet"
