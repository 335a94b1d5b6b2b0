"""pyrank: streaming low-rank SVD of LLM weight updates ΔW = W_t − W_0.

Fused kernels compute (W_t − W_0)·X and its transpose straight from bf16/fp16/fp32
weights; a randomized, warm-startable top-k SVD runs on them.

    import pyrank
    res = pyrank.svd_lowrank(W_t, k=1, base=W_0)        # res.U, res.S, res.V, res.passes
    nxt = pyrank.svd_lowrank(W_t2, k=1, base=W_0, init=res)  # warm start
"""
from . import adapters, analysis, ops  # (neither imports peft or transformers)
from .extrapolate import Prediction, rank_k_reconstruction
from .temporal import temporal_extrapolate
from .linalg import LowRankSVD, default_oversample, svd_lowrank, torch_svd_lowrank
from .ops import BackendUnavailable
from .track import Rank1Tracker

__version__ = "0.1.0"

__all__ = [
    "ops",
    "adapters",
    "analysis",
    "LowRankSVD",
    "svd_lowrank",
    "torch_svd_lowrank",
    "default_oversample",
    "BackendUnavailable",
    "Rank1Tracker",
    "Prediction",
    "rank_k_reconstruction",
    "temporal_extrapolate",
    "__version__",
]
