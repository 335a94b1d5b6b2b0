"""Track a checkpoint series: pyrank's Rank1Tracker vs per-checkpoint SVDs.

Series: M modules × T checkpoints of an RL-like bf16 update (pyrank.testing.rl_like_series:
the low-rank directions turn ~1e-3 rad per checkpoint; default 12 × 10 of 4096×11008).
Every method computes the top-1 triplet of every (module, checkpoint) ΔW:

  pyrank             Rank1Tracker(k=1).observe per checkpoint: warm starts, tol 1e-4, plus
                     ‖ΔW‖_F for the energy fraction, summed in the first pass's read
  torch.linalg.svd   full dense SVD of each materialized fp32 ΔW — what AlphaRL's published
                     code does. At ~20–40 s per matrix here, it is timed on --dense-sample
                     (module, checkpoint) pairs and the total is that mean × M·T (labelled).
  torch.svd_lowrank  torch.svd_lowrank(W_t.float() − W_0.float(), q=6, niter=2) per
                     checkpoint, every pair timed

Accuracy: pyrank's σ₁ and u₁ against torch.linalg.svd (float64) on the sampled pairs.

    python benchmarks/bench_track.py                          # ~6 min on 2 cores
    python benchmarks/bench_track.py --modules 2 --steps 4 --shape 1024x2048 --no-write
    python benchmarks/bench_track.py --device cuda --shape 8192x28672 --modules 4

With --device cuda the series lives on the GPU and every method runs there, timed to the
end of its GPU work. That path has not run on a GPU yet (no session that wrote it had one).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, peak_rss_mb, require_device, sync  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--modules", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dense-sample", type=int, default=2, help="pairs timed with torch.linalg.svd")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    require_device(args.device)
    dev = torch.device(args.device)

    import pyrank
    from pyrank.testing import rl_like_series

    m, n = map(int, args.shape.split("x"))
    be = pyrank.ops.resolve_backend(args.backend, dev)[0]
    tracker = pyrank.Rank1Tracker(k=1, backend=be)
    t_pyrank = t_lowrank = 0.0
    dense_times, errs = [], []
    for mod in range(args.modules):
        name = f"model.layers.{mod}.mlp.up_proj.weight"
        W0, series = rl_like_series(m, n, args.steps, angle=1e-3, seed=100 + mod)
        W0, series = W0.to(dev), [W.to(dev) for W in series]
        for step, Wt in enumerate(series, start=1):
            sync(dev)
            t = time.perf_counter()
            tracker.observe(step, {name: Wt}, {name: W0})
            sync(dev)
            t_pyrank += time.perf_counter() - t
            t = time.perf_counter()
            torch.svd_lowrank(Wt.float() - W0.float(), q=6, niter=2)
            sync(dev)
            t_lowrank += time.perf_counter() - t
            if len(dense_times) < args.dense_sample and step in (1, args.steps):
                t = time.perf_counter()
                U, S, Vh = torch.linalg.svd(Wt.float() - W0.float(), full_matrices=False)
                sync(dev)
                dense_times.append(time.perf_counter() - t)
                Ur, Sr, _ = (T.cpu() for T in torch.linalg.svd(Wt.double() - W0.double(), full_matrices=False))
                h = tracker.history(name)
                i = h["steps"].index(float(step))
                errs.append((abs(float(h["sigma"][i, 0]) - float(Sr[0])) / float(Sr[0]),
                             math.degrees(math.acos(min(1.0, abs(float(h["u"][i, :, 0].double() @ Ur[:, 0])))))))
        print(f"module {mod + 1}/{args.modules}: pyrank {t_pyrank:.2f} s, svd_lowrank {t_lowrank:.2f} s",
              file=sys.stderr, flush=True)
        del series
    pairs = args.modules * args.steps
    passes = sum(r["passes"] for r in tracker.summary())
    t_dense = sum(dense_times) / len(dense_times) * pairs
    rows = [
        dict(method=f"pyrank Rank1Tracker [{be}]", time_s=t_pyrank, passes=passes,
             per_pair_ms=t_pyrank / pairs * 1e3, note="warm-started; ‖ΔW‖_F read in the first pass"),
        dict(method="torch.linalg.svd (materialized ΔW)", time_s=t_dense, passes="dense",
             per_pair_ms=t_dense / pairs * 1e3, x=t_dense / t_pyrank,
             note=f"{len(dense_times)} of {pairs} SVDs timed, total = mean × {pairs}"),
        dict(method="torch.svd_lowrank(ΔW, q=6, niter=2)", time_s=t_lowrank, passes=6 * pairs,
             per_pair_ms=t_lowrank / pairs * 1e3, x=t_lowrank / t_pyrank, note="every pair timed"),
    ]
    cols = [("method", "method", "{}"), ("total (s)", "time_s", "{:.2f}"), ("per ΔW (ms)", "per_pair_ms", "{:.1f}"),
            ("passes", "passes", "{}"), ("pyrank speed-up", "x", "{:.1f}×"), ("note", "note", "{}")]
    acc = (f"pyrank vs float64 LAPACK on the sampled pairs: max σ₁ error {max(e for e, _ in errs):.1e} (relative), "
           f"max u₁ angle {max(a for _, a in errs):.2g}°.")
    peak = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if dev.type == "cuda"
            else f"peak RSS {peak_rss_mb():.0f} MB")
    text = (f"Machine: {machine()}\n\nDevice: {args.device}. {args.modules} modules × {args.steps} checkpoints "
            f"of {args.shape} bf16 (rl_like_series, ~1e-3 rad drift per checkpoint); {peak}.\n\n"
            f"{markdown_table(rows, cols)}\n\n{acc}\n")
    emit("bench_track", rows, text, not args.no_write)

if __name__ == "__main__":
    main()
