"""RLVR diagnostics (METHODS.md §3). So far: bf16 update sparsity; the rest is an open issue."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops

_CHUNK_ELEMS = 1 << 22


def changed_count(W0: Tensor, Wt: Tensor, eta: float = 1e-3) -> int:
    """Entries with |w_t − w_0| > η·max(|w_t|, |w_0|), counted a block of rows at a time
    (no fp32 copy of the whole matrix)."""
    ops.check_weights(Wt, W0, names=("Wt", "W0"))
    m, n = W0.shape
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    cd = ops.compute_dtype(W0.dtype)
    changed = 0
    for i in range(0, m, rows):
        a, b = W0[i:i + rows].to(cd), Wt[i:i + rows].to(cd)
        changed += int(((b - a).abs() > eta * torch.maximum(a.abs(), b.abs())).sum())
    return changed


def update_sparsity(W0: Tensor, Wt: Tensor, eta: float = 1e-3) -> float:
    """Fraction of unchanged weights: |w_t − w_0| ≤ η·max(|w_t|, |w_0|) (for bf16 and
    η = 1e-3 the same as bitwise equality). 1 − changed/total."""
    total = W0.numel()
    return 1.0 - changed_count(W0, Wt, eta) / total if total else 1.0
