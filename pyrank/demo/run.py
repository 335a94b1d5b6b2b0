"""``pyrank demo``: a real tiny RL run, then pyrank's analysis of its own checkpoints.

1. Generate the task (fixed-width addition; disjoint train / validation / test sets).
2. SFT a small Llama-style model to a base policy of moderate accuracy; save it (bf16).
3. RL (GRPO, or HPT) from the base with the verifier's reward, saving a bf16 checkpoint
   every ``save_every`` steps in the transformers ``checkpoint-N/`` layout, and its
   validation accuracy (the metric for AlphaRL's PLS fit) in ``run/val_accuracy.csv``.
4. ``pyrank analyze --diagnostics`` on the run (the library calls that command makes) → σ₁
   trajectories, energy fractions, linearity R², bf16 update sparsity, principal angles,
   spectral shift, principal-weight overlaps.
5. Rank-1 dominance: the test accuracy of W₀ + norm-matched rank-1 part of the final
   update (every selected module; every other tensor from W₀, as AlphaRL's reference code
   does, and for comparison from the final checkpoint), vs the final model and the base.
6. AlphaRL: fit the first ``window`` fraction of the checkpoints and extrapolate to the
   last step (rank-1 linear in the step, base="last", with the reference code's update
   W_k + û*·v_kᵀ in float32 and with the growth variant; RELEX's temporal mode); the test
   accuracy of each prediction beside the window's last checkpoint and the final model.

Everything is computed here, now; nothing is downloaded or precomputed. Deterministic
for a given seed on a given machine (torch's CPU kernels may reduce in a different order
with a different thread count).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .model import DemoConfig, DemoLM, load_weights, save_checkpoint
from .task import accuracy, split_problems
from .train import rl, supervised


@dataclass
class DemoSettings:
    """Every knob of the run. ``quick()`` is the < 1 minute variant the tests use."""

    digits: int = 2
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 1000
    sft_steps: int = 250
    sft_batch: int = 128
    sft_lr: float = 3e-3
    rl_steps: int = 600
    prompts_per_step: int = 32
    group: int = 8
    rl_lr: float = 3e-5
    save_every: int = 50
    gamma: float = 0.0  # HPT's threshold on the group's mean reward
    window: float = 0.4  # AlphaRL fits the first 40% of the checkpoints

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(n_val=200, n_test=400, sft_steps=200, rl_steps=60, rl_lr=1e-4, save_every=10)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr for a training phase (silent with ``quiet`` or off a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def run_demo(out: str, *, seed: int = 0, algo: str = "grpo", quick: bool = False, force: bool = False,
             settings: DemoSettings | None = None, quiet: bool = False) -> dict:
    """Run the whole demo into directory ``out``; returns the report (also ``out/report.json``).
    ``quiet``: no progress bars (there are none off a terminal either).

    ``out`` must not exist unless ``force``; on any failure nothing is left there (an old
    ``out`` replaced with ``force`` is restored)."""
    from ..io.writers import check_output

    if algo not in ("grpo", "hpt"):
        raise ValueError(f"algo must be 'grpo' or 'hpt', got {algo!r}")
    st = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = os.path.abspath(out)
    check_output(out, [], force)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rename(out, os.path.join(old, "x"))
    os.makedirs(out)
    try:
        report = _run(out, st, seed, algo, quiet)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old:
            os.rename(os.path.join(old, "x"), out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return report


def _run(out: str, st: DemoSettings, seed: int, algo: str, quiet: bool = False) -> dict:
    from .. import pipeline
    from ..extrapolate import Overlay, rank_k_reconstruction
    from ..temporal import temporal_extrapolate
    from ..io import find_checkpoints, open_weights
    from ..report import jsonable, print_diagnostics, print_summary

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, val, test = split_problems(st.digits, st.n_train, st.n_val, st.n_test, seed)
    cfg = DemoConfig(hidden_size=st.hidden_size, intermediate_size=(st.hidden_size * 11 // 4 + 7) // 8 * 8,
                     num_hidden_layers=st.layers, num_attention_heads=st.heads)
    model = DemoLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    _say(f"[1/5] task: {st.digits}-digit addition ({len(train.prompts)} train / {len(val.prompts)} val / "
         f"{len(test.prompts)} test problems); model: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
         f"{n_params / 1e3:.0f}k parameters")

    with _bar(st.sft_steps, "SFT", quiet) as bar:
        supervised(model, train, steps=st.sft_steps, batch=st.sft_batch, lr=st.sft_lr, generator=gen,
                   log=lambda step, loss: (bar.set_postfix_str(f"loss {loss:.3f}", refresh=False), bar.update()))
    base_dir, run_dir = os.path.join(out, "base"), os.path.join(out, "run")
    save_checkpoint(model, base_dir, {"global_step": 0})
    evaluator = DemoLM(cfg)  # evaluates what was saved (bf16), not the fp32 master weights

    def acc_of(weights, problems):
        return accuracy(load_weights(evaluator, weights), problems)

    base_w = open_weights(base_dir)
    acc = {"base": acc_of(base_w, test)}
    _say(f"[2/5] SFT {st.sft_steps} steps → base policy: test accuracy {acc['base']:.3f} "
         f"({time.perf_counter() - t_start:.0f} s)")

    os.makedirs(run_dir)
    curve, val_acc = [], {0: acc_of(base_w, val)}

    def on_step(step, stats):
        bar.set_postfix_str(f"reward {stats['reward']:.3f}", refresh=False)
        bar.update()
        curve.append(dict(step=step, **stats))
        if step % st.save_every == 0 or step == st.rl_steps:
            d = os.path.join(run_dir, f"checkpoint-{step}")
            save_checkpoint(model, d, {"global_step": step})
            val_acc[step] = acc_of(open_weights(d), val)

    with _bar(st.rl_steps, algo.upper(), quiet) as bar:
        rl(model, train, steps=st.rl_steps, prompts_per_step=st.prompts_per_step, group=st.group, lr=st.rl_lr,
           generator=gen, algo=algo, gamma=st.gamma, on_step=on_step)
    with open(os.path.join(run_dir, "val_accuracy.csv"), "w") as f:
        f.write("step,value\n" + "".join(f"{s},{v}\n" for s, v in val_acc.items() if s > 0))
    ckpts = find_checkpoints(run_dir)
    steps = [s for s, _ in ckpts]
    final_step, final_w = steps[-1], open_weights(ckpts[-1][1])
    acc["final"] = acc_of(final_w, test)
    _say(f"[3/5] {algo.upper()} {st.rl_steps} steps ({st.prompts_per_step} prompts × {st.group} samples), "
         f"{len(ckpts)} checkpoints → test accuracy {acc['final']:.3f} "
         f"({time.perf_counter() - t_start:.0f} s)")

    # what `pyrank analyze BASE --run-dir RUN --metrics … --diagnostics --out …/analysis` runs
    _say(f"[4/5] pyrank analyze {base_dir} --run-dir {run_dir} --metrics {run_dir}/val_accuracy.csv "
         f"--diagnostics --out {out}/analysis")
    series = pipeline.open_series(base_dir, run_dir=run_dir, metrics=os.path.join(run_dir, "val_accuracy.csv"))
    result = pipeline.analyze_run(series, pipeline.AnalyzeOptions(diagnostics=True, quiet=quiet))
    pipeline.write_analysis(result, os.path.join(out, "analysis"), inputs=series.inputs)
    print_summary(result.report)
    print_diagnostics(result.report)
    print(f"wrote {out}/analysis/report.json, modules.csv, plots and tracker/ ({len(series.modules)} modules × "
          f"{len(series.checkpoints)} checkpoints)")
    tracker = result.tracker
    analysis = jsonable(result.report)  # (as report.json has it: NaN as None)
    names = analysis["selected_modules"]

    # Rank-1 dominance: W0 + α·σ1·u1·v1ᵀ for every selected module of the final model; every
    # other tensor (embeddings, norms, lm_head) from the base, as AlphaRL's reference code
    # does — and, to show what that choice is worth, from the final checkpoint.
    def rank1_of(n):
        return rank_k_reconstruction(base_w[n], final_w[n], k=1)

    acc["final_rank1"] = acc_of(Overlay(base_w, names, rank1_of), test)
    acc["final_rank1_rest_final"] = acc_of(Overlay(final_w, names, rank1_of), test)

    # AlphaRL from the first `window` of the checkpoints.
    n_win = max(3, int(math.floor(st.window * len(ckpts) + 1e-9)))
    if n_win >= len(ckpts):
        raise ValueError(f"{len(ckpts)} checkpoints: too few to hold out the last after a window of {n_win}")
    win_step, win_dir = ckpts[n_win - 1]
    win_w = open_weights(win_dir)
    acc["window_last"] = acc_of(win_w, test)
    # AlphaRL's reference code adds û*·v_kᵀ to W_k and keeps the model in float32; the growth
    # variant adds only (û* − û_k)·v_kᵀ (W_k already holds its rank-1 part)
    for key, update in (("alpharl_step", "official"), ("alpharl_growth", "growth")):
        pred = tracker.extrapolate(to_step=final_step, window=(steps[0], win_step), base="last", update=update)
        acc[key] = acc_of(pred.apply(win_w, dtype=torch.float32), test)
    temporal = temporal_extrapolate(base_w, [open_weights(d) for _, d in ckpts[:n_win]], steps[:n_win],
                                    final_step, names=names)
    acc["temporal"] = acc_of(Overlay(win_w, names, lambda n: temporal[n]), test)

    report = _report(st, seed, algo, cfg, n_params, acc, curve, val_acc, steps, n_win, win_step, final_step,
                     analysis)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _plots(report, out)
    _say(f"[5/5] analysis done ({report['seconds']:.0f} s)\n")
    _print_tables(report)
    _say(f"\nwrote {out}/: base/, run/checkpoint-*/ (bf16 safetensors), analysis/ (pyrank analyze), "
         "report.json, training.png, accuracy.png")
    return report


def _report(st, seed, algo, cfg, n_params, acc, curve, val_acc, steps, n_win, win_step, final_step, analysis):
    by_type = {}
    for m in analysis["modules"].values():
        by_type.setdefault(m["type"], []).append(m)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    types = {}
    for typ, ms in sorted(by_type.items()):
        types[typ] = {
            "modules": len(ms),
            "sigma1": [mean([m["sigma"][i][0] for m in ms]) for i in range(len(steps))],
            "energy_final": mean([m["energy"][-1] for m in ms]),
            "r2_step": mean([m["r2_step"] for m in ms]),
            "r2_metric": mean([m["r2_metric"] for m in ms]),
            "sparsity_final": mean([m["sparsity"][-1] for m in ms]),
        }
    gain = acc["final"] - acc["base"]
    return {
        "settings": asdict(st), "seed": seed, "algo": algo, "model": cfg.to_hf(), "parameters": n_params,
        "steps": steps, "window": {"checkpoints": n_win, "last_step": win_step}, "final_step": final_step,
        "accuracy": acc,
        "rank1_relative_accuracy": acc["final_rank1"] / acc["final"] if acc["final"] > 0 else None,
        "rank1_gain_recovered": (acc["final_rank1"] - acc["base"]) / gain if gain != 0 else None,
        "module_types": types, "val_accuracy": {str(k): v for k, v in sorted(val_acc.items())},
        "training_curve": curve,
    }


def _print_tables(r):
    a = r["accuracy"]
    _say("module type     n   σ1 (first → last)     energy σ1²/‖ΔW‖²   R² step   R² vs val acc   sparsity")
    for typ, t in r["module_types"].items():
        s = t["sigma1"]
        fmt = lambda x: "  n/a" if x is None else f"{x:5.3f}"
        _say(f"{typ:<12}{t['modules']:>4}   {s[0]:8.4f} → {s[-1]:8.4f}   {fmt(t['energy_final']):>17}   "
             f"{fmt(t['r2_step']):>7}   {fmt(t['r2_metric']):>13}   {fmt(t['sparsity_final']):>8}")
    w, f = r["window"]["last_step"], r["final_step"]
    _say(f"\n{'model (test accuracy, ' + str(r['settings']['n_test']) + ' held-out problems)':<62}{'accuracy':>9}")
    rows = [("base (SFT, step 0)", a["base"]),
            (f"final (step {f})", a["final"]),
            ("base + norm-matched rank-1 of the final update", a["final_rank1"]),
            ("  the same, non-module tensors from the final checkpoint", a["final_rank1_rest_final"]),
            (f"checkpoint at step {w} (first {r['window']['checkpoints']} checkpoints)", a["window_last"]),
            (f"step {w} + AlphaRL rank-1 extrapolation to step {f}", a["alpharl_step"]),
            ("  the same, --update growth (W_k + (û* − û_k)·v_kᵀ)", a["alpharl_growth"]),
            (f"step {w} + temporal (RELEX) extrapolation to step {f}", a["temporal"])]
    for name, v in rows:
        _say(f"{name:<62}{v:>9.3f}")
    rel, rec = r["rank1_relative_accuracy"], r["rank1_gain_recovered"]
    if rel is not None:
        _say(f"\nrank-1 model: {100 * rel:.1f}% of the final accuracy"
             + (f", {100 * rec:.0f}% of the RL gain" if rec is not None else "")
             + " (other tensors from the base, as AlphaRL)")
    for key, label in (("alpharl_step", "AlphaRL"), ("alpharl_growth", "AlphaRL (growth)"),
                       ("temporal", "temporal")):
        _say(f"{label}: step {w} → {a[key]:.3f} vs {a['window_last']:.3f} without extrapolation and "
             f"{a['final']:.3f} trained to step {f} ({'helps' if a[key] > a['window_last'] else 'does not help'})")


def _plots(r, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'pyrank[plots]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    c = r["training_curve"]
    ax[0].plot([x["step"] for x in c], [x["reward"] for x in c], lw=0.8, label="mean reward (sampled)")
    va = r["val_accuracy"]
    ax[0].plot([float(k) for k in va], list(va.values()), marker="o", label="validation accuracy (greedy)")
    ax[0].axvline(r["window"]["last_step"], color="gray", ls="--", lw=0.8, label="AlphaRL window end")
    ax[0].set_xlabel("RL step")
    ax[0].legend(fontsize=8)
    for typ, t in r["module_types"].items():
        ax[1].plot(r["steps"], t["sigma1"], marker=".", label=typ)
    ax[1].set_xlabel("RL step")
    ax[1].set_ylabel("σ1 of ΔW (mean over layers)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training.png"), dpi=110)
    plt.close(fig)
    a = r["accuracy"]
    labels = ["base", "final", "rank-1\nof final", f"step {r['window']['last_step']}", "+AlphaRL", "+temporal"]
    vals = [a["base"], a["final"], a["final_rank1"], a["window_last"], a["alpharl_step"], a["temporal"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, vals, color=["#999", "#333", "#4a7", "#aaa", "#47a", "#a74"])
    ax.set_ylabel("test accuracy")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=110)
    plt.close(fig)
