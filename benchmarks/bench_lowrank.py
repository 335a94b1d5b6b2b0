"""pyrank.torch_svd_lowrank (the drop-in) against torch.svd_lowrank, on every kind of input.

Both run the same algorithm with the same random draws (same q, niter; a seeded call gives
the same answer to rounding), so the columns compare only how A − M is read: pyrank's fused
pass over A and M, or torch's matmuls. Where the drop-in hands a call to torch (no M, small
matrices, ...) the ratio shows what the hand-over costs. bf16 inputs, which torch.svd_lowrank
cannot take, are compared with torch on their float32 copies, the upcast inside torch's time.

Accuracy: max |σ_i − σ_i*| / σ_1* over the q values, σ* from float64 LAPACK on the exact
A − M (identical algorithms should agree here; a difference would be a bug).

    python benchmarks/bench_lowrank.py                  # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, timed  # noqa: E402

# (label, batch, m, n, dtype, M kind)
CASES = [
    ("gaussian, no M", (), 300, 200, torch.float32, None),
    ("small batch, no M", (64,), 32, 32, torch.float64, None),
    ("small batch, M", (64,), 32, 32, torch.float32, "full"),
    ("small, M", (), 64, 64, torch.float64, "full"),
    ("M", (), 128, 128, torch.float32, "full"),
    ("M", (), 512, 512, torch.float64, "full"),
    ("M", (), 1024, 1024, torch.float32, "full"),
    ("PCA (column mean)", (), 4000, 1000, torch.float32, "mean"),
    ("batch, M", (4,), 1024, 512, torch.float32, "full"),
    ("bf16 ΔW = W_t − W_0", (), 4096, 11008, torch.bfloat16, "rl"),
    ("bf16, no M", (), 2048, 2048, torch.bfloat16, None),
    ("fp32 ΔW = W_t − W_0", (), 4096, 11008, torch.float32, "rl"),
]


def make(batch, m, n, dtype, kind, small):
    g = torch.Generator().manual_seed(0)
    if small:
        m, n = max(4, m // 16), max(4, n // 16)
    if kind == "rl":
        from pyrank.testing import rl_like_pair

        Wt, W0 = rl_like_pair(m, n, dtype=dtype, seed=0)
        return Wt, W0
    A = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    if kind is None:
        return A.to(dtype), None
    if kind == "mean":
        A += 3 * torch.randn(n, generator=g, dtype=torch.float64)
        return A.to(dtype), A.mean(-2, keepdim=True).to(dtype)
    return A.to(dtype), torch.randn(*batch, m, n, generator=g, dtype=torch.float64).to(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q", type=int, default=6)
    ap.add_argument("--niter", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="every shape 16× smaller (a smoke test)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import pyrank
    from pyrank import linalg

    rows = []
    for label, batch, m, n, dtype, kind in CASES:
        A, M = make(batch, m, n, dtype, kind, args.small)
        half = dtype in (torch.bfloat16, torch.float16)
        route = linalg._dropin_route(A, M)

        def ours():
            torch.manual_seed(1)
            return pyrank.torch_svd_lowrank(A, args.q, args.niter, M)

        def theirs():
            torch.manual_seed(1)
            if half:  # torch.svd_lowrank cannot take bf16: the float32 copies it would need
                return torch.svd_lowrank(A.float(), args.q, args.niter, None if M is None else M.float())
            return torch.svd_lowrank(A, args.q, args.niter, M)

        D = A.double() - (0 if M is None else M.double())
        s = torch.linalg.svdvals(D)[..., :args.q]
        s1 = float(s[..., 0].max())
        reps = max(1, args.repeats if A.numel() < 2**24 else 3)
        t_p, (_, S_p, _) = timed(ours, repeats=reps)
        t_t, (_, S_t, _) = timed(theirs, repeats=reps)
        shape = "×".join(map(str, (*batch, *A.shape[-2:])))
        rows.append(dict(case=label, shape=shape, dtype=str(dtype).replace("torch.", ""),
                         route=route, passes=2 * args.niter + 2, pyrank_ms=1e3 * t_p, torch_ms=1e3 * t_t,
                         ratio=t_p / t_t, err_pyrank=float((S_p.double() - s).abs().max()) / s1,
                         err_torch=float((S_t.double() - s).abs().max()) / s1))
        print(f"{label} {shape} done", file=sys.stderr, flush=True)
    cols = [("case", "case", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"),
            ("drop-in runs", "route", "{}"), ("reads", "passes", "{}"),
            ("pyrank (ms)", "pyrank_ms", "{:.2f}"), ("torch (ms)", "torch_ms", "{:.2f}"),
            ("pyrank ÷ torch", "ratio", "{:.2f}"), ("σ error pyrank", "err_pyrank", "{:.1e}"),
            ("σ error torch", "err_torch", "{:.1e}")]
    text = (f"Machine: {machine()}\n\n`pyrank.torch_svd_lowrank` vs `torch.svd_lowrank`, q = {args.q}, "
            f"niter = {args.niter}, median of {args.repeats} (3 for the largest); 'reads' = passes over "
            f"A (and M) for both. Routes: pyrank = fused kernels; torch = torch's own implementation "
            f"(handed over); upcast = torch on the float32 copy.\n\n{markdown_table(rows, cols)}\n")
    emit("bench_lowrank", rows, text, not args.no_write)


if __name__ == "__main__":
    main()
