"""PiSSA initialization of a bf16 weight: pyrank vs peft's own paths.

peft's ``init_lora_weights="pissa_niter_N"`` calls ``torch.svd_lowrank(W, r, niter=N)`` (fp32,
no oversampling); plain ``"pissa"`` calls ``torch.linalg.svd``. pyrank.adapters.pissa_init
computes the top-r triplets with its own SVD to a residual tolerance.

The weight: 4096×11008 bf16 with a slowly decaying (power-law) spectrum, like trained
weights, plus a noise floor — so consecutive singular values are close and the top-r
subspace is hard to pin down. Error: ‖P_r − P_r*‖_F / ‖P_r*‖_F for the top-r part P_r =
U_r S_r V_rᵀ of each method against float64 LAPACK (P_r* = s·B·A for PiSSA).

    python benchmarks/bench_adapters.py                 # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, timed  # noqa: E402


def make_weight(m, n, rank=1024, power=0.6, seed=0):
    from pyrank.testing import random_orthonormal

    g = torch.Generator().manual_seed(seed)
    rank = min(rank, m, n)  # (small shapes: a smoke test's)
    a, b = random_orthonormal(m, rank, g), random_orthonormal(n, rank, g)
    s = (torch.arange(rank, dtype=torch.float64) + 1) ** -power
    W = ((a * s) @ b.T).float() + 2e-4 * torch.randn(m, n, generator=g)
    return (W * (0.02 / float(W.std()))).to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--tols", default="1e-4,1e-2",
                    help="pyrank tolerances; the ratio column compares with the first (default 1e-4,1e-2: "
                         "the accurate setting, and one loose enough to stay below the baselines' error)")
    ap.add_argument("--model-hidden", type=int, default=4096, help="whole-model table: hidden size")
    ap.add_argument("--model-mlp", type=int, default=11008, help="whole-model table: MLP size")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from pyrank.adapters import pissa_init

    m, n = map(int, args.shape.split("x"))
    W = make_weight(m, n)
    print("float64 reference ...", file=sys.stderr, flush=True)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    rows = []
    for r in [int(x) for x in args.ranks.split(",")]:
        ref = (U[:, :r] * S[:r]) @ Vh[:r]
        refn = float(ref.norm())

        def err(Ur, Sr, Vr):
            return float(((Ur.double() * Sr.double()) @ Vr.double().T - ref).norm()) / refn

        tols = [float(x) for x in args.tols.split(",")]
        for tol in tols:
            t, (A, B, _) = timed(lambda: pissa_init(W, r, 2 * r, tol=tol), repeats=1)
            s = 2.0  # lora_alpha / r
            e = float((s * B.double() @ A.double() - ref).norm()) / refn
            rows.append(dict(r=r, method=f"pyrank pissa_init (tol {tol:g})", time_s=t, err=e))
        for niter in (4, 16):
            t, (Ur, Sr, Vr) = timed(lambda: torch.svd_lowrank(W.float(), q=r, niter=niter), repeats=1)
            rows.append(dict(r=r, method=f"torch.svd_lowrank(niter={niter}) (peft pissa_niter_{niter})",
                             time_s=t, err=err(Ur, Sr, Vr)))
        t, (Uf, Sf, Vhf) = timed(lambda: torch.linalg.svd(W.float(), full_matrices=False), repeats=1, warmup=0)
        rows.append(dict(r=r, method="torch.linalg.svd (peft pissa)", time_s=t,
                         err=err(Uf[:, :r], Sf[:r], Vhf[:r].T)))
        mine = rows[-3 - len(tols):]
        base = mine[0]["time_s"]
        for x in mine[1:]:
            x["x"] = x["time_s"] / base
        gap = float(S[r - 1] / S[r])
        for x in mine:
            x["gap"] = gap
        print(f"r={r} done", file=sys.stderr, flush=True)
    cols = [("r", "r", "{}"), ("σ_r/σ_r+1", "gap", "{:.3f}"), ("method", "method", "{}"),
            ("time (s)", "time_s", "{:.2f}"), ("top-r error", "err", "{:.1e}"),
            ("its time ÷ pyrank's (first tol)", "x", "{:.2f}")]
    model_rows = whole_model(args.model_hidden, args.model_mlp, [int(x) for x in args.ranks.split(",")])
    mcols = [("r", "r", "{}"), ("method", "method", "{}"), ("init time (s)", "time_s", "{:.2f}"),
             ("mean top-r error", "err", "{:.1e}"), ("its time ÷ pyrank's", "x", "{:.2f}")]
    text = (f"Machine: {machine()}\n\nPiSSA init of a {args.shape} bf16 weight (power-law spectrum "
            f"σ_i ∝ i^-0.6 over 1024 directions plus noise); one timed run each (the dense SVD takes "
            f"tens of seconds).\n\n{markdown_table(rows, cols)}\n\n"
            f"Whole model: one layer's seven projections (hidden {args.model_hidden}, MLP {args.model_mlp}, bf16) "
            f"through peft, one timed run each.\n\n{markdown_table(model_rows, mcols)}\n")
    emit("bench_adapters", rows + model_rows, text, not args.no_write)


def whole_model(h, f, ranks):
    """peft's pissa_niter_4 against pyrank's init_peft_model (default tol) on one layer's
    projections; returns table rows."""
    import time

    import peft
    from pyrank.adapters import init_peft_model

    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    weights = {name: make_weight(m, n, seed=i + 1) for i, (name, (m, n)) in enumerate(shapes.items())}
    print("float64 references (whole model) ...", file=sys.stderr, flush=True)
    refs = {name: torch.linalg.svd(W.double(), full_matrices=False) for name, W in weights.items()}

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, W in weights.items():
                lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.bfloat16)
                lin.weight.data.copy_(W)
                setattr(self, name, lin)

    def mean_err(model, r):
        errs = []
        for name in shapes:
            lay = getattr(model.base_model.model, name)
            BA = lay.scaling["default"] * lay.lora_B["default"].weight.double() @ lay.lora_A["default"].weight.double()
            U, S, Vh = refs[name]
            ref = (U[:, :r] * S[:r]) @ Vh[:r]
            errs.append(float((BA - ref).norm() / ref.norm()))
        return sum(errs) / len(errs)

    rows = []
    for r in ranks:
        def cfg(init):
            return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(shapes), init_lora_weights=init)

        t = time.perf_counter()
        ours = peft.get_peft_model(Layer(), cfg(True))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the save-flow warning
            init_peft_model(ours, "pissa")
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = peft.get_peft_model(Layer(), cfg("pissa_niter_4"))
        t_theirs = time.perf_counter() - t
        rows.append(dict(table="model", r=r, method="pyrank init_peft_model (default tol)", time_s=t_ours,
                         err=mean_err(ours, r)))
        rows.append(dict(table="model", r=r, method="peft pissa_niter_4", time_s=t_theirs,
                         err=mean_err(theirs, r), x=t_theirs / t_ours))
        print(f"whole model r={r} done", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
