"""pyrank's primitives: time per pass, GB/s, and the fraction of this machine's bandwidth.

Bandwidth is measured in the same run by a plain large copy (bytes read + written over
time). A pass of delta_mm / delta_mm_t / delta_mm_both / delta_sqnorm reads A and B once;
merge_lowrank reads W and writes the result. "ideal" is bytes ÷ bandwidth; the issue's
target is each pass within 1.5× of it (column "× ideal").

    python benchmarks/bench_ops.py                 # 4096×11008 bf16, backends cpu and torch
    python benchmarks/bench_ops.py --backends triton --shape 8192x28672   # on a GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, sync  # noqa: E402



def median_time(fn, dev, repeats):
    fn()
    sync(dev)
    if dev.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0] / 1e3
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth(dev, repeats):
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=dev).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), dev, repeats)
    return 2 * src.numel() * 4 / t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", default="cpu,torch")
    ap.add_argument("--ks", default="1,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from pyrank import ops
    from pyrank.testing import rl_like_pair

    m, n = map(int, args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda" if "triton" in args.backends and torch.cuda.is_available() else "cpu")
    A, B = (t.to(dev) for t in rl_like_pair(m, n, dtype=dtype))
    esize = A.element_size()
    bw = copy_bandwidth(dev, args.repeats)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)", file=sys.stderr)
    rows = []
    for be in args.backends.split(","):
        for k in [int(k) for k in args.ks.split(",")]:
            X = torch.randn(n, k, device=dev)
            Y = torch.randn(m, k, device=dev)
            U, S, V = torch.randn(m, k, device=dev), torch.rand(k, device=dev), torch.randn(n, k, device=dev)
            out = torch.empty_like(A)
            cases = [
                ("delta_mm", lambda: ops.delta_mm(A, B, X, backend=be), 2 * m * n * esize),
                ("delta_mm_t", lambda: ops.delta_mm_t(A, B, Y, backend=be), 2 * m * n * esize),
                ("delta_mm_both", lambda: ops.delta_mm_both(A, B, X, Y, backend=be), 2 * m * n * esize),
                ("merge_lowrank", lambda: ops.merge_lowrank(A, U, S, V, 0.1, out=out, backend=be),
                 2 * m * n * esize),
            ]
            if k == 1:
                cases.append(("delta_sqnorm", lambda: ops.delta_sqnorm(A, B, backend=be), 2 * m * n * esize))
            for name, fn, nbytes in cases:
                t = median_time(fn, dev, args.repeats)
                ideal = nbytes / bw
                rows.append(dict(backend=be, op=name, k=k if name != "delta_sqnorm" else "–",
                                 shape=args.shape, dtype=args.dtype, time_ms=t * 1e3,
                                 gbps=nbytes / t / 1e9, frac_bw=nbytes / t / bw, x_ideal=t / ideal,
                                 bandwidth_gbps=bw / 1e9))
                print(f"{be:6s} {name:14s} k={k:3d} {t * 1e3:8.2f} ms {nbytes / t / 1e9:6.1f} GB/s",
                      file=sys.stderr, flush=True)
    cols = [("backend", "backend", "{}"), ("op", "op", "{}"), ("k", "k", "{}"), ("time (ms)", "time_ms", "{:.2f}"),
            ("GB/s", "gbps", "{:.1f}"), ("of copy BW", "frac_bw", "{:.0%}"), ("× ideal", "x_ideal", "{:.2f}")]
    text = (f"Machine: {machine()}\n\n{args.shape} {args.dtype} pair; copy bandwidth {bw / 1e9:.1f} GB/s "
            f"(read + write, 256 MiB); median of {args.repeats}.\n\n{markdown_table(rows, cols)}\n")
    emit("bench_ops", rows, text, not args.no_write)

if __name__ == "__main__":
    main()
