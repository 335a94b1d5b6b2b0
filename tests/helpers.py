"""Shared references and comparisons for the tests (float64 LAPACK is the truth)."""
import math

import torch

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DT_ID = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def make_pair(m, n, dtype, seed=0, layout="contiguous", with_base=True, scale=1.0):
    """(A, B) of shape (m, n) in ``dtype`` laid out as asked; B None when not with_base."""
    g = torch.Generator().manual_seed(seed)

    def one():
        if layout == "contiguous":
            t = torch.randn(m, n, generator=g)
        elif layout == "transposed":  # a (n, m) row-major buffer seen as (m, n)
            t = torch.randn(n, m, generator=g).t()
        elif layout == "sliced":  # every other row and column of a bigger buffer
            t = torch.randn(2 * m + 1, 2 * n + 3, generator=g)[1::2, ::2]
        else:
            raise ValueError(layout)
        return (t * scale).to(dtype)

    A = one()
    return A, (one() if with_base else None)


def exact_delta(A, B):
    return A.double() - (B.double() if B is not None else 0)


def compute_eps(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rel_err(out, ref):
    ref = ref.double()
    den = ref.norm().item()
    return (out.double() - ref).norm().item() / (den if den > 0 else 1.0)


def sin_angle(U, W):
    """Largest principal-angle sine between the column spans of U and W (float64)."""
    Qa = torch.linalg.qr(U.double())[0]
    Qb = torch.linalg.qr(W.double())[0]
    c = torch.linalg.svdvals(Qa.T @ Qb)
    cmin = float(c.min()) if c.numel() else 1.0
    return math.sqrt(max(0.0, 1.0 - min(1.0, cmin) ** 2))


def assert_orthonormal(Q, atol):
    k = Q.shape[1]
    err = (Q.double().T @ Q.double() - torch.eye(k, dtype=torch.float64)).abs().max().item()
    assert err <= atol, f"columns not orthonormal: max |QᵀQ − I| = {err:.2e}"


def merge_within_bound(out, ref, W, U, S, V, alpha):
    """out vs the fp32 reference of W + α·U·diag(S)·Vᵀ: one ulp of the result plus the fp32
    error of summing the terms in another order (which matters where they cancel)."""
    k = U.shape[1]
    diff = (out.double() - ref.double()).abs()
    ulp = torch.finfo(W.dtype).eps * ref.double().abs()
    terms = W.double().abs() + abs(alpha) * (U.double().abs() * S.double().abs()) @ V.double().abs().T
    accum = (k + 1) * compute_eps(W.dtype) * terms
    return bool((diff <= ulp + accum + torch.finfo(W.dtype).tiny).all())


def run_writer(script, out, env, nproc=2):
    """Run a fixture writer (a script in tests/) under torchrun with ``nproc`` ranks on this
    machine; fails the test with the writer's output if it fails."""
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), script), str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out


def pyrank_cli(*args, env=None):
    """``python -m pyrank ARGS`` as a user runs it: (completed process)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pyrank", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def analyze_and_extrapolate(base, run, out, env, *flags):
    """``pyrank [FLAGS] analyze BASE --run-dir RUN --k 2`` into OUT/analysis and ``pyrank
    extrapolate … --to-step 10`` into OUT/prediction, as a user runs them (both must
    succeed): (report.json's modules, analyze's stderr, the predicted model's weights)."""
    import json
    import os

    from pyrank.io import open_weights

    p = pyrank_cli(*flags, "analyze", base, "--run-dir", run, "--k", "2", "--out", os.path.join(out, "analysis"),
                   "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    q = pyrank_cli("extrapolate", base, "--run-dir", run, "--to-step", "10", "--out", os.path.join(out, "prediction"),
                   "--quiet", env=env)
    assert q.returncode == 0, q.stderr
    with open(os.path.join(out, "analysis", "report.json")) as f:
        modules = json.load(f)["modules"]
    return modules, p.stderr, open_weights(os.path.join(out, "prediction"))


def assert_same_weights(a, b):
    """Two weight mappings hold the same names and, tensor for tensor, equal values."""
    assert set(a) == set(b)
    for n in b:
        assert torch.equal(a[n], b[n]), n
