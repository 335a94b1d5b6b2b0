"""Top-k SVD of an RL-like bf16 update ΔW = W_t − W_0: pyrank vs what users would otherwise run.

Baselines (all measured in the same run, on the same data):
  torch.linalg.svd       full dense SVD of the materialized fp32 ΔW (what AlphaRL's code does)
  torch.svd_lowrank(ΔW)  on the materialized fp32 ΔW, q = k + 5 (q = 6 at k = 1), niter = 2
  torch.svd_lowrank(M=)  torch.svd_lowrank(W_t.float(), q, niter=2, M=W_0.float())
  sklearn                sklearn.utils.extmath.randomized_svd on the fp32 ΔW (its defaults)
Materialization and dtype conversions are inside every baseline's time.

pyrank runs cold (random start) and warm (the next checkpoint, whose top subspace turned
by ~1e-3 rad, started from the previous result), to tol = 1e-4.

Accuracy is against a float64 LAPACK SVD of the exact stored ΔW: max |σ_i − σ_i*| / σ_1 over
the top k, and the largest and the RMS principal angle between the top-k left subspaces
(degrees; the largest is ill-defined, for every method, where σ_k sits inside the noise
bulk — see σ_k/σ_{k+1} — the RMS one says how much of the subspace is right). "certified":
the triplets pyrank converged to tol; the others sit in a cluster of Ritz values and were
accepted at residual ≤ 7e-3 (svd_lowrank's cluster_tol).

Each method runs in its own subprocess; "extra peak memory" is its peak resident memory
(CPU) or peak allocated GPU memory (--device cuda) beyond the inputs (W_0, W_1, W_2 in
bf16), over all k (and cold + warm for pyrank).

    python benchmarks/bench_svd.py                      # full run (~20 min on 2 cores)
    python benchmarks/bench_svd.py --shapes 1024x2048 --ks 1,8 --no-write   # quick look
    python benchmarks/bench_svd.py --device cuda --backends triton,torch --shapes 8192x28672 --ks 1,8

With --device cuda the weights, every baseline and the float64 reference run on the GPU
(sklearn, a CPU library, is skipped). That path has not run on a GPU yet (no session that
wrote it had one); its CPU counterpart is what RESULTS.md reports.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, emit, machine, markdown_table, require_device, timed  # noqa: E402

SEED = 0


def make_data(m, n):
    from pyrank.testing import rl_like_series

    W0, (W1, W2) = rl_like_series(m, n, 2, angle=1e-3, seed=SEED)
    return W0, W1, W2


def reference(m, n, kmax, path, device):
    """float64 SVD (LAPACK, or cuSOLVER with --device cuda) of both checkpoints' exact ΔW;
    top kmax vectors saved to ``path`` (on the CPU)."""
    W0, W1, W2 = make_data(m, n)
    out = {}
    for name, W in (("cold", W1), ("warm", W2)):
        D = W.to(device).double() - W0.to(device).double()
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        out[name] = (U[:, :kmax].cpu().clone(), S.cpu().clone(), Vh[:kmax].T.cpu().clone())
        del D, U, S, Vh
    torch.save(out, path)


def accuracy(U, S, ref, k):
    Ur, Sr, _ = ref
    s1 = float(Sr[0])
    serr = (S[:k].double().cpu() - Sr[:k]).abs().max().item() / s1
    Qa = torch.linalg.qr(U[:, :k].double().cpu())[0]
    c = torch.linalg.svdvals(Qa.T @ Ur[:, :k]).clamp(max=1.0)
    angle = torch.rad2deg(torch.arccos(c.min())).item()
    rms = torch.rad2deg(torch.arcsin(torch.sqrt((1 - c**2).clamp(min=0).mean()))).item()
    return serr, angle, rms


def worker(method, m, n, ks, ref_path, repeats, device):
    """Run one method for every k; print one JSON line per k."""
    dev = torch.device(device)
    W0, W1, W2 = (W.to(dev) for W in make_data(m, n))
    refs = torch.load(ref_path)
    rows = []
    # Memory beyond the inputs: count the peak from here (the data above is every method's).
    mem = PeakMemory(dev)

    def timed_here(fn, repeats=repeats, warmup=1):
        return timed(fn, repeats, warmup, device=dev)

    if method == "torch.linalg.svd":  # k-independent: one run serves every k
        t, (U, S, V) = timed_here(lambda: torch.linalg.svd(W1.float() - W0.float(), full_matrices=False),
                                  repeats=1, warmup=0)
        for k in ks:
            serr, ang, rms = accuracy(U, S, refs["cold"], k)
            rows.append(dict(k=k, time_s=t, passes="dense", sigma_err=serr, angle_deg=ang, rms_deg=rms))
    for k in ks if method != "torch.linalg.svd" else []:
        q = max(6, k + 5)
        if method.startswith("pyrank"):
            import pyrank

            backend = method[len("pyrank["):-1]

            t, res = timed_here(lambda: pyrank.svd_lowrank(W1, k, base=W0, backend=backend))
            serr, ang, rms = accuracy(res.U, res.S, refs["cold"], k)
            rows.append(dict(k=k, time_s=t, passes=res.passes, sigma_err=serr, angle_deg=ang, rms_deg=rms,
                             converged=res.converged, certified=f"{int(res.certified.sum())}/{k}"))
            tw, rw = timed_here(lambda: pyrank.svd_lowrank(W2, k, base=W0, init=res, backend=backend))
            serr, ang, rms = accuracy(rw.U, rw.S, refs["warm"], k)
            rows.append(dict(k=k, time_s=tw, passes=rw.passes, sigma_err=serr, angle_deg=ang, rms_deg=rms,
                             converged=rw.converged, certified=f"{int(rw.certified.sum())}/{k}", variant="warm"))
            continue
        if method == "torch.svd_lowrank(ΔW)":
            fn = lambda: torch.svd_lowrank(W1.float() - W0.float(), q=q, niter=2)  # noqa: E731
            passes = 2 * 2 + 2
        elif method == "torch.svd_lowrank(M=W0)":
            fn = lambda: torch.svd_lowrank(W1.float(), q=q, niter=2, M=W0.float())  # noqa: E731
            passes = 2 * 2 + 2
        elif method == "sklearn.randomized_svd":
            from sklearn.utils.extmath import randomized_svd

            def fn():
                U, S, Vt = randomized_svd((W1.float() - W0.float()).numpy(), k, random_state=0)
                return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vt.T)

            n_iter = 7 if k < 0.1 * min(m, n) else 4
            passes = 2 * n_iter + 2
        else:
            raise SystemExit(f"unknown method {method}")
        t, (U, S, V) = timed_here(fn)
        serr, ang, rms = accuracy(U, S, refs["cold"], k)
        rows.append(dict(k=k, time_s=t, passes=passes, sigma_err=serr, angle_deg=ang, rms_deg=rms))
    extra = mem.extra_mb()
    for r in rows:
        r.setdefault("variant", "cold")
        print(json.dumps({**r, "method": method, "extra_rss_mb": extra}), flush=True)


BASELINES = ["torch.linalg.svd", "torch.svd_lowrank(ΔW)", "torch.svd_lowrank(M=W0)", "sklearn.randomized_svd"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096")
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--backends", default="auto", help="comma list of pyrank backends to run (default auto)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of baselines to skip")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the weights live and every method runs (default cpu)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "SHAPE", "KS", "REF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, shape, ks, ref = args.worker
        m, n = map(int, shape.split("x"))
        worker(method, m, n, [int(k) for k in ks.split(",")], ref, args.repeats, args.device)
        return

    import pyrank.ops

    require_device(args.device)
    backends = [pyrank.ops.resolve_backend(b, torch.device(args.device))[0] for b in args.backends.split(",")]
    mine = [f"pyrank[{b}]" for b in backends]
    ks = [int(k) for k in args.ks.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    if args.device == "cuda":
        skip.add("sklearn.randomized_svd")  # a CPU library: not a GPU user's alternative
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            m, n = map(int, shape.split("x"))
            ref = os.path.join(tmp, f"ref_{shape}.pt")
            print(f"[{shape}] float64 reference ...", file=sys.stderr, flush=True)
            reference(m, n, max(ks), ref, args.device)
            S_ref = torch.load(ref)["cold"][1]
            for method in mine + [b for b in BASELINES if b not in skip]:
                print(f"[{shape}] {method} ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--device", args.device,
                       "--worker", method, shape, args.ks, ref]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr)
                    raise SystemExit(f"{method} failed on {shape}")
                for line in out.stdout.splitlines():
                    r = json.loads(line)
                    k = r["k"]
                    r.update(shape=shape, gap=float(S_ref[k - 1] / S_ref[k]))
                    rows.append(r)

    # ratios: every baseline's time over pyrank's (cold and warm), per shape and k
    for r in rows:
        if r["method"] not in mine:
            continue
        for b in BASELINES:
            base = [x for x in rows if x["method"] == b and x["shape"] == r["shape"] and x["k"] == r["k"]]
            if base:
                r["x_" + b] = base[0]["time_s"] / r["time_s"]

    cols = [("shape", "shape", "{}"), ("k", "k", "{}"), ("σ_k/σ_k+1", "gap", "{:.2f}"),
            ("method", "method", "{}"), ("start", "variant", "{}"), ("time (s)", "time_s", "{:.3f}"),
            ("passes", "passes", "{}"), ("max σ err/σ1", "sigma_err", "{:.1e}"),
            ("max angle (°)", "angle_deg", "{:.2g}"), ("RMS angle (°)", "rms_deg", "{:.2g}"),
            ("certified", "certified", "{}"),
            ("extra peak GPU memory (MB)" if args.device == "cuda" else "extra peak RSS (MB)", "extra_rss_mb", "{:.0f}")]
    table = markdown_table(rows, cols)
    ratio_rows = [r for r in rows if r["method"] in mine]
    rcols = [("shape", "shape", "{}"), ("k", "k", "{}"), ("method", "method", "{}"), ("start", "variant", "{}"),
             ("pyrank (s)", "time_s", "{:.3f}"), ("passes", "passes", "{}")] + [
        (f"× vs {b}", "x_" + b, "{:.1f}") for b in BASELINES if b not in skip]
    ratios = markdown_table(ratio_rows, rcols)
    text = (f"Machine: {machine()}\n\nDevice: {args.device}; pyrank tol = 1e-4; median of {args.repeats} "
            f"(dense SVD: 1 run).\n\nSpeed-up of pyrank (baseline time ÷ pyrank time):\n\n{ratios}\n\n"
            f"All rows:\n\n{table}\n")
    emit("bench_svd", rows, text, not args.no_write)

if __name__ == "__main__":
    main()
