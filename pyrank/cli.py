"""The ``pyrank`` command (also ``python -m pyrank``).

Bad input ends with one line, ``pyrank: error: …`` naming the file or tensor, exit status 2,
no traceback (``--debug`` shows it), and nothing written.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import signal
import sys

EXAMPLES = {
    "analyze": """examples:
  pyrank analyze base_model/ run/checkpoint-100 run/checkpoint-200 run/checkpoint-300 --out report/
  pyrank analyze base_model/ --run-dir run/ --metrics acc.csv --k 4 --out report/
  pyrank analyze base_model/ --run-dir verl_run/ --include 'lm_head' --exclude 'layers\\.0\\.' --out r/
  pyrank analyze base_model/ --run-dir run/ --resume run/pyrank_tracker --out report/
  pyrank analyze base_model/ --run-dir run/ --diagnostics --diag-k 16 --alpha 0.05 --out report/
  torchrun --nproc-per-node 8 -m pyrank analyze base_model/ --run-dir run/ --out report/""",
    "extrapolate": """examples:
  pyrank extrapolate base/ run/checkpoint-{100,200,300,400} --to-step 1000 --out predicted/
  pyrank extrapolate base/ --run-dir run/ --window 0:400 --metrics acc.csv --target-metric 0.55 --out p/
  pyrank extrapolate base/ --run-dir run/ --window 0:400 --to-step 1000 --base initial --scale 0.7 --out p/""",
    "reconstruct": """examples:
  pyrank reconstruct base/ run/checkpoint-1000 --rank 1 --out rank1_model/
  pyrank reconstruct base/ run/checkpoint-1000 --rank 1 --scale 0.7 --out rank1_l07/""",
    "demo": """examples:
  pyrank demo                       # ~1 min on 2 CPU cores, writes pyrank-demo/
  pyrank demo --quick --out /tmp/d  # < 1 min, smaller run
  pyrank demo --algo hpt --seed 1 --out demo-hpt/""",
    "env": "example:\n  pyrank env",
}


class CLIError(Exception):
    pass


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyrank", description="Streaming low-rank SVD of LLM weight updates W_t - W_0.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    def series_args(sp, need_out=True):
        sp.add_argument("base", help="the base model (before RL): HF directory, .safetensors or .pt/.bin")
        sp.add_argument("checkpoints", nargs="*", help="checkpoint directories or files, in any order")
        sp.add_argument("--run-dir", help="a training run: checkpoint-N/, global_step_N/actor/huggingface/ "
                                          "or global_stepN_hf/ folders")
        sp.add_argument("--steps", help="comma-separated steps of the CHECKPOINTS when their names don't say")
        sp.add_argument("--metrics", help="CSV (step,value) or JSON ({step: value}) of an evaluation metric")
        sp.add_argument("--include", action="append", default=[], metavar="REGEX",
                        help="also analyze tensors whose name matches (repeatable)")
        sp.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                        help="skip tensors whose name matches (repeatable)")
        sp.add_argument("--k", type=int, default=1, help="singular triplets per module (default 1)")
        sp.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the math runs: auto = the CUDA device if there is one (Triton kernels), "
                             "else the CPU (C++ kernels); weights are moved one tensor at a time")
        sp.add_argument("--out", required=need_out, help="output directory (must not exist, unless --force)")
        sp.add_argument("--force", action="store_true", help="replace an existing output directory")

    a = sub.add_parser("analyze", help="track the top-k triplets of every module over a checkpoint series",
                       description="Track σ, u, v of every module's update over a checkpoint series; write "
                                   "report.json, modules.csv and plots.", epilog=EXAMPLES["analyze"],
                       formatter_class=fmt)
    series_args(a)
    a.add_argument("--diagnostics", action="store_true",
                   help="also report the diagnostics of docs/METHODS.md §3 per module and checkpoint: principal angles between the top "
                        "singular subspaces of W0 and Wt, normalized spectral shift, overlap of the changed mask "
                        "with the principal and the low-magnitude weights, Jaccard with the previous mask")
    a.add_argument("--diag-k", type=int, default=16, help="k of the diagnostics' SVDs of the weights (default 16)")
    a.add_argument("--alpha", type=float, default=0.05,
                   help="density of the principal / low-magnitude weight masks (default 0.05)")
    a.add_argument("--eta", type=float, default=1e-3,
                   help="relative change below which a weight counts as unchanged (default 1e-3: bf16 bitwise)")
    a.add_argument("--resume", metavar="TRACKER_DIR", nargs="?", const=RESUME_OUT,
                   help="without a value: continue this command after an interruption (an analysis keeps "
                        "each finished checkpoint until it completes); with one: continue a saved tracker "
                        "(analyze's tracker/, or Rank1Callback's pyrank_tracker/). Either way the kept "
                        "observations must come from this base and these checkpoints, and only the rest is "
                        "analyzed")
    a.set_defaults(func=_cmd_analyze)

    e = sub.add_parser("extrapolate", help="AlphaRL: predict a later checkpoint from early ones",
                       description="Fit each module's rank-1 trajectory over a window of checkpoints and "
                                   "write the predicted model (a loadable HF directory).",
                       epilog=EXAMPLES["extrapolate"], formatter_class=fmt)
    series_args(e)
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-step", type=float, help="extrapolate linearly in the step to this step")
    g.add_argument("--target-metric", type=float, help="invert AlphaRL's PLS fit at this metric value")
    e.add_argument("--window", help="A:B, the steps (inclusive) to fit on (default: all given)")
    e.add_argument("--base", dest="base_mode", choices=["last", "initial"], default="last",
                   help="the weights the prediction is added to: last = the last window checkpoint W_k "
                        "(default, as AlphaRL's reference code), initial = W_0")
    e.add_argument("--update", choices=["official", "growth"], default="official",
                   help="official: add λ·û*·v_kᵀ (AlphaRL's reference code; default); growth (needs --base "
                        "last): add λ·(û* − û_k)·v_kᵀ, only the predicted growth of W_k's rank-1 part")
    e.add_argument("--dtype", choices=["float32", "same"], default="float32",
                   help="float32: write the predicted model in float32, as AlphaRL's reference code does "
                        "(default; a bf16 rounding drops update entries below half a bf16 ulp of the weight); "
                        "same: keep each tensor's dtype (half the size)")
    e.add_argument("--scale", type=float, default=1.0, help="λ, the update's scale (default 1)")
    e.set_defaults(func=_cmd_extrapolate)

    r = sub.add_parser("reconstruct", help="the rank-k dominance model W_0 + λ·α·U_k S_k V_kᵀ",
                       description="Replace every module's update by its norm-matched rank-k part; every other "
                                   "tensor comes from the base (as in AlphaRL's reference code; --rest checkpoint "
                                   "takes them from the checkpoint instead).", epilog=EXAMPLES["reconstruct"],
                       formatter_class=fmt)
    r.add_argument("base")
    r.add_argument("checkpoint")
    r.add_argument("--rank", type=int, default=1)
    r.add_argument("--scale", type=float, default=1.0)
    r.add_argument("--no-norm-match", action="store_true", help="α = 1 instead of ‖ΔW‖_F/‖S_k‖₂")
    r.add_argument("--rest", choices=["base", "checkpoint"], default="base",
                   help="where the tensors that are not reconstructed (embeddings, norms, lm_head, ...) come "
                        "from: base = W_0 (default, AlphaRL's reference code), checkpoint = W_t")
    r.add_argument("--include", action="append", default=[], metavar="REGEX")
    r.add_argument("--exclude", action="append", default=[], metavar="REGEX")
    r.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = the CUDA device if there is one, else the CPU")
    r.add_argument("--out", required=True)
    r.add_argument("--force", action="store_true")
    r.set_defaults(func=_cmd_reconstruct)

    d = sub.add_parser("demo", help="a tiny RL run on a generated task, then AlphaRL on its own checkpoints",
                       description="Train a small Llama-style model on multi-digit addition (SFT, then GRPO or "
                                   "HPT with a verifiable reward), save bf16 checkpoints, and run pyrank's "
                                   "analysis on them: σ1 trajectories, rank-1 dominance, AlphaRL and temporal "
                                   "extrapolation, each scored on held-out problems.",
                       epilog=EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("--out", default="pyrank-demo", help="output directory (default pyrank-demo; must not "
                                                        "exist, unless --force)")
    d.add_argument("--quick", action="store_true", help="a smaller run (< 1 minute), as the tests use")
    d.add_argument("--algo", choices=["grpo", "hpt"], default="grpo", help="RL algorithm (default grpo)")
    d.add_argument("--seed", type=int, default=0, help="seed of data, model and sampling (default 0)")
    d.add_argument("--force", action="store_true", help="replace an existing output directory")
    d.set_defaults(func=_cmd_demo)

    env = sub.add_parser("env", help="print versions and which backends are available (and why not)",
                         description="Print versions, devices, CPU features and the status of every backend.",
                         epilog=EXAMPLES["env"], formatter_class=fmt)
    env.set_defaults(func=_cmd_env)
    return p


# ------------------------------------------------------------------ shared plumbing


def _series(args):
    """[(step, path)] sorted by step, from --run-dir or the positional checkpoints."""
    from .io import find_checkpoints

    if args.run_dir and args.checkpoints:
        raise CLIError("give either CHECKPOINTS or --run-dir, not both")
    if args.run_dir:
        series = find_checkpoints(args.run_dir)
    else:
        if not args.checkpoints:
            raise CLIError("no checkpoints: give CHECKPOINTS or --run-dir")
        for c in args.checkpoints:
            if not os.path.exists(c):
                raise CLIError(f"{c}: no such file or directory")
        if args.steps:
            try:
                steps = [float(s) for s in args.steps.split(",")]
            except ValueError:
                raise CLIError(f"--steps {args.steps!r}: not a comma-separated list of numbers") from None
            if len(steps) != len(args.checkpoints):
                raise CLIError(f"--steps has {len(steps)} values for {len(args.checkpoints)} checkpoints")
        else:
            from .io.readers import step_of

            steps = []
            for c in args.checkpoints:
                st = step_of(c)
                if st is None:
                    raise CLIError(f"{c}: cannot tell its step from the name or trainer_state.json; pass --steps")
                steps.append(st)
        series = sorted(zip(steps, args.checkpoints))
    seen = {}
    for st, path in series:
        if st in seen:
            raise CLIError(f"{path} and {seen[st]} are both step {st:g}")
        seen[st] = path
    return series


def _read_metrics(path, steps):
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not a metrics file (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read ({exc.strerror})") from None
    pairs = []
    try:
        if path.endswith(".json"):
            obj = json.loads(text)
            if isinstance(obj, list):
                pairs = [(float(d["step"]), float(d["value"])) for d in obj]
            else:
                pairs = [(float(k), float(v)) for k, v in obj.items()]
        else:
            for row in csv.reader(io.StringIO(text)):
                if not row or row[0].strip().lower() in ("step", "#"):
                    continue
                pairs.append((float(row[0]), float(row[1])))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: not a metrics file (CSV step,value or JSON step→value): {exc}") from None
    metrics = {}
    for step, value in pairs:
        if step in metrics:
            raise CLIError(f"{path}: step {step:g} appears twice ({metrics[step]:g} and {value:g})")
        metrics[step] = value
    bad = sorted(s for s, v in metrics.items() if not math.isfinite(v))
    if bad:
        print(f"pyrank: warning: {path}: ignoring non-finite values at step(s) "
              f"{', '.join(f'{s:g}' for s in bad)}", file=sys.stderr)
        metrics = {s: v for s, v in metrics.items() if math.isfinite(v)}
    unknown = sorted(set(metrics) - set(steps))
    if unknown:
        raise CLIError(f"{path}: step {unknown[0]:g} matches no checkpoint (checkpoint steps: "
                       f"{', '.join(f'{s:g}' for s in steps)})")
    return metrics


def _device(args):
    """--device: 'auto' is the current CUDA device when there is one (the Triton kernels then
    run on the GPU), else the CPU. Weights are read to the CPU and moved one at a time."""
    import torch

    want = getattr(args, "device", "cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    return torch.device(want, torch.cuda.current_device()) if want == "cuda" else torch.device("cpu")


def _open(path, device=None):
    from .io import open_weights
    from .io.readers import OnDevice

    w = open_weights(path)
    return OnDevice(w, device) if device is not None and device.type != "cpu" else w


def _shape_of(weights, name):
    if hasattr(weights, "shape_dtype"):
        return weights.shape_dtype(name)
    t = weights[name]
    return tuple(t.shape), str(t.dtype)


def _modules(base, args):
    from .io import select_modules

    matched = select_modules(list(base), args.include, args.exclude)
    names = [n for n in matched if len(_shape_of(base, n)[0]) == 2]
    skipped = [n for n in matched if n not in set(names)]
    if skipped:
        print(f"pyrank: note: skipping {len(skipped)} selected tensor(s) that are not 2-D matrices: "
              f"{', '.join(skipped[:3])}{', …' if len(skipped) > 3 else ''}", file=sys.stderr)
    if not names:
        raise CLIError(f"{getattr(base, 'source', 'base')}: no module selected (default: attention/MLP "
                       "projections of the repeated blocks; use --include REGEX)")
    return names


_FLOAT_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32", "torch.float64")


def _check_series(base, ckpts, names, k=None):
    """Every module is a floating matrix with at least ``k`` rows and columns, and every
    checkpoint has it with the base's shape and dtype (read headers only)."""
    want = {n: _shape_of(base, n) for n in names}
    src = getattr(base, "source", "base")
    for n, (shape, dtype) in want.items():
        if str(dtype) not in _FLOAT_DTYPES:
            raise CLIError(f"{src}: module {n!r} is {dtype}; pyrank analyzes bfloat16, float16, float32 or "
                           "float64 weights (use --exclude to leave it out)")
        if k is not None and k > min(shape):
            raise CLIError(f"--k {k} exceeds the smaller side of module {n!r} {list(shape)}; "
                           f"the largest k every selected module allows is {min(min(s) for s, _ in want.values())}")
    for step, path, w in ckpts:
        for n in names:
            if n not in w:
                raise CLIError(f"{path}: missing module {n!r} (present in the base)")
            got = _shape_of(w, n)
            if got != want[n]:
                (s1, d1), (s0, d0) = got, want[n]
                raise CLIError(f"{path}: module {n!r} is {list(s1)} {d1}, the base has {list(s0)} {d0}")


class _Progress:
    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0
        self.tty = sys.stderr.isatty()

    def step(self, what=""):
        self.done += 1
        if self.tty:
            w = 30
            fill = int(w * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (w - fill)}] {self.done}/{self.total} {what[:40]:<40}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)


RESUME_OUT = "\0out"  # --resume without a value: the interrupted analysis of this --out


def _partial_dir(out):
    """Where an analysis keeps what it has finished, checkpoint by checkpoint, until it
    completes: a hidden sibling of ``out``."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def _resumed(args, names, steps, base):
    """The tracker ``--resume`` continues (None without it), checked against this run: the
    same k, modules of this selection with the base's shapes, steps of this series (the
    weights behind each observation are compared as they are read, in :func:`_track`)."""
    from .track import Rank1Tracker

    resume = getattr(args, "resume", None)
    if not resume:
        return None
    if resume == RESUME_OUT:
        src = _partial_dir(args.out)
        parts = sorted(os.path.join(src, d) for d in os.listdir(src)
                       if not d.startswith(".")) if os.path.isdir(src) else []  # (not a writer's temporary)
        parts = [d for d in parts if os.path.exists(os.path.join(d, "tracker.json"))]
        if not parts:
            raise CLIError(f"--resume: no interrupted analysis of {args.out} to continue "
                           "(give --resume TRACKER_DIR to continue a saved tracker)")
        try:  # rank parts of each step; steps in order, so the last part's warm starts win
            loaded = Rank1Tracker.union([Rank1Tracker.load(d) for d in
                                         sorted(parts, key=lambda d: float(d.rsplit("-step-", 1)[1]))])
        except (OSError, ValueError) as exc:
            raise CLIError(f"--resume: {exc}") from None
        where = src
    else:
        try:
            loaded = Rank1Tracker.load(resume)
        except (OSError, ValueError) as exc:
            raise CLIError(f"{resume}: not a saved pyrank tracker ({exc})") from None
        where = resume
    if loaded.k != args.k:
        raise CLIError(f"{where}: the tracker has k={loaded.k}, but --k is {args.k}")
    extra = [n for n in loaded.modules if n not in set(names)]
    if extra:
        raise CLIError(f"{where}: the tracker holds {len(extra)} module(s) this base and selection do not have "
                       f"(e.g. {extra[0]!r}): it belongs to another model or run")
    have = ", ".join(f"{s:g}" for s in steps)
    for n in loaded.modules:
        if tuple(loaded._shapes[n]) != tuple(_shape_of(base, n)[0]):
            raise CLIError(f"{where}: module {n!r} is {list(loaded._shapes[n])} in the tracker but "
                           f"{list(_shape_of(base, n)[0])} in the base: it belongs to another model")
        lost = [s for s in loaded.steps(n) if s not in set(steps)]
        if lost:
            raise CLIError(f"{where}: the tracker has step {lost[0]:g}, which this series lacks "
                           f"(checkpoint steps: {have})")
    return loaded


def _track(base, ckpts, names, args, metrics, extras=False, resumed=None, partial=None):
    """Track every module over the checkpoints. With ``extras``: per module and step, the
    bf16 update sparsity, and with ``--diagnostics`` the rest of docs/METHODS.md §3 (principal
    angles, NSS, principal-weight overlaps, Jaccard with the previous checkpoint's mask).
    ``resumed``: a tracker whose observations are kept (each is checked against the
    weights it claims to come from). ``partial``: a path prefix; after each checkpoint its
    new observations are saved to ``PREFIX-step-S`` (what ``--resume`` continues from).
    Returns (tracker, {module: {step: {column: value}}})."""
    from .analysis import diagnostics, update_jaccard, update_sparsity
    from .linalg import svd_lowrank
    from .track import Rank1Tracker, _fmt, fingerprint

    tr = Rank1Tracker(k=args.k, backend=args.backend)
    if resumed is not None:  # continue a saved tracker: its observations are kept, the rest are added
        tr = Rank1Tracker.merged([resumed], order=[n for n in names if n in resumed.modules])
        tr.backend = args.backend
    diag = extras and getattr(args, "diagnostics", False)
    per = {n: {} for n in names}
    base_svd = {}
    prog = _Progress(len(ckpts) * len(names), "tracking")
    for i, (step, path, w) in enumerate(ckpts):
        new = False
        for n in names:
            W, W0 = w[n], base[n]
            try:
                if not (n in tr.modules and step in tr.steps(n)):
                    tr.observe(step, {n: W}, {n: W0}, modules=[n])
                    new = True
                else:  # a resumed observation: it must come from these very weights
                    fp = tr.fingerprints(n)
                    for what, T, key in (("base", W0, "base"), (path, W, _fmt(step))):
                        if key in fp and fp[key] != fingerprint(T):
                            raise CLIError(f"--resume: module {n!r} of {what} is not what the tracker's "
                                           f"step {step:g} was computed from: it belongs to another run")
                if diag:
                    if n not in base_svd:  # W₀'s top-k serves every checkpoint
                        base_svd[n] = svd_lowrank(W0, min(args.diag_k, *W0.shape), tol=1e-6, backend=args.backend)
                    d = diagnostics(W0, W, args.diag_k, args.alpha, args.eta, base_svd=base_svd[n],
                                    backend=args.backend)
                    j, jb = update_jaccard(W0, ckpts[i - 1][2][n], W, args.eta) if i else (None, None)
                    # the diagnostics counted the changed weights already: no second read for the sparsity
                    per[n][step] = dict({"sparsity": 1.0 - d["changed_fraction"]}, **d, jaccard_prev=j,
                                        jaccard_baseline=jb)
                elif extras:
                    per[n][step] = {"sparsity": update_sparsity(W0, W, args.eta)}
            except ValueError as exc:
                raise CLIError(f"{path}: {exc}") from None
            prog.step(n)
        if step in metrics:
            tr.set_metric(step, metrics[step])
        if partial is not None and new and tr.modules:
            tr.save(f"{partial}-step-{_fmt(step)}", steps=[step])
    return tr, per


def _layer_type(name):
    from .io.select import layer_index

    layer = layer_index(name)
    typ = name[:-len(".weight")].rsplit(".", 1)[-1] if name.endswith(".weight") else name
    return layer, typ


def _jsonable(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------ commands


def _check_numbers(args):
    """Arguments that need no file: finite numbers, positive counts (before anything is read)."""
    if getattr(args, "k", 1) < 1:
        raise CLIError(f"--k must be >= 1, got {args.k}")
    for opt in ("to_step", "target_metric", "scale", "alpha", "eta"):
        v = getattr(args, opt, None)
        if v is not None and not math.isfinite(v):
            raise CLIError(f"--{opt.replace('_', '-')} must be a finite number, got {v}")


def _check_writable(out):
    """The output's parent must exist (or be creatable) and be writable, before any compute."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{out}: cannot write there ({probe} is not a writable directory)")


def _prepare(args):
    """Everything validated before any output exists: arguments, paths, steps, metrics,
    modules, shapes."""
    from .io.writers import check_output

    _check_numbers(args)
    _check_writable(args.out)
    dev = _device(args)
    base = _open(args.base, dev)
    series = _series(args)
    inputs = [args.base] + [p for _, p in series] + ([args.run_dir] if args.run_dir else [])
    check_output(args.out, inputs, args.force)
    metrics = _read_metrics(args.metrics, [s for s, _ in series]) if args.metrics else {}
    names = _modules(base, args)
    ckpts = [(float(s), p, _open(p, dev)) for s, p in series]
    _check_series(base, ckpts, names, getattr(args, "k", None))
    return base, ckpts, names, metrics, inputs


def _numel(weights, name):
    return math.prod(_shape_of(weights, name)[0])


def _on_ranks(world, fn):
    """Run ``fn()`` on every rank and gather its result; an error on any rank becomes the
    same CLIError on every rank (so no rank waits forever for the others)."""
    def describe(exc):
        msg = str(exc) if isinstance(exc, CLIError) else f"{type(exc).__name__}: {exc}"
        return f"rank {world.rank}: {msg}"

    results, err = world.on_all(fn, describe)
    if err:
        raise CLIError(err)
    return results


def _track_sharded(world, base, ckpts, names, args, metrics, extras=False, partial=None):
    """:func:`_track` with the modules split across the ranks by size; rank 0 gets the
    merged tracker (modules in ``names`` order) and extras, the other ranks None.
    ``partial``: the directory each rank saves its finished checkpoints into."""
    from .distributed import shard_by_size
    from .track import Rank1Tracker

    resumed = _resumed(args, names, [c[0] for c in ckpts], base)
    prefix = None if partial is None else os.path.join(partial, f"rank{world.rank:05d}")
    if not world.distributed:
        return _track(base, ckpts, names, args, metrics, extras, resumed, prefix)
    mine = shard_by_size([(n, _numel(base, n)) for n in names], world.size)[world.rank]
    parts = _on_ranks(world, lambda: _track(base, ckpts, mine, args, metrics, extras, resumed, prefix))
    if world.rank != 0:
        return None, None
    per = {}
    for _, p in parts:
        per.update(p)
    return Rank1Tracker.merged([tr for tr, _ in parts], order=names), {n: per[n] for n in names}


def _in_world(cmd):
    """A command run on every torchrun rank (or in one process without torchrun)."""
    def run(args) -> int:
        from .distributed import World

        world = World.from_env()
        try:
            return cmd(args, world)
        finally:
            world.close()
    return run


@_in_world
def _cmd_analyze(args, world) -> int:
    from .io.writers import atomic_dir, check_output

    if args.diagnostics and not (args.diag_k >= 1 and 0 < args.alpha < 1):
        raise CLIError(f"--diag-k must be >= 1 and --alpha in (0, 1); got {args.diag_k} and {args.alpha}")
    base, ckpts, names, metrics, inputs = _prepare(args)
    partial = _partial_dir(args.out)
    if world.rank == 0 and args.resume != RESUME_OUT and os.path.isdir(partial):
        print(f"pyrank: note: starting over; the interrupted analysis of {args.out} is discarded "
              "(pass --resume to continue it instead)", file=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)
    world.all_gather(None)  # a barrier: no rank saves a part before rank 0 has cleared the old ones
    try:
        tr, per = _track_sharded(world, base, ckpts, names, args, metrics, extras=True, partial=partial)
    except Exception:
        # an error (not an interruption: those raise BaseException) in a fresh analysis: its
        # parts are of no use to anyone; a resumed one keeps them for a corrected command
        if args.resume != RESUME_OUT and world.rank == 0 and not _signalled:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if world.rank != 0:
        return 0
    report = {"base": os.path.abspath(args.base), "k": args.k, "eta": args.eta,
              "checkpoints": [{"step": s, "path": os.path.abspath(p)} for s, p, _ in ckpts],
              "metrics": {f"{s:g}": v for s, v in metrics.items()}, "selected_modules": names, "modules": {}}
    rows = []
    for n in names:
        h = tr.history(n)
        layer, typ = _layer_type(n)
        r2s, r2m, r2mh = tr.r2_step(n), tr.r2_metric(n), tr.r2_metric(n, vector="u_hat")
        report["modules"][n] = {
            "layer": layer, "type": typ, "shape": list(_shape_of(base, n)[0]), "steps": h["steps"],
            "sigma": h["sigma"].tolist(), "fro": h["fro"].tolist(), "energy": h["energy"].tolist(),
            "drift_u": h["drift_u"].tolist(), "drift_v": h["drift_v"].tolist(),
            "sparsity": [per[n][s]["sparsity"] for s in h["steps"]], "r2_step": r2s, "r2_metric": r2m,
            "r2_metric_uhat": r2mh,
            "passes": h["passes"], "converged": bool((h["residual"] <= tr.tol).all()),
        }
        if args.diagnostics:
            report["modules"][n]["diagnostics"] = [
                {c: v for c, v in per[n][s].items() if c != "sparsity"} for s in h["steps"]]
        for i, s in enumerate(h["steps"]):
            row = {"module": n, "layer": layer, "type": typ, "step": s}
            row.update({f"sigma_{j + 1}": float(h["sigma"][i, j]) for j in range(h["sigma"].shape[1])})
            row.update(fro=float(h["fro"][i]), energy=float(h["energy"][i]), drift_u=float(h["drift_u"][i]),
                       drift_v=float(h["drift_v"][i]), r2_step=r2s, r2_metric=r2m, r2_metric_uhat=r2mh)
            row.update(per[n][s])
            rows.append(row)
    if args.diagnostics:
        report["diagnostics"] = {"k": args.diag_k, "alpha": args.alpha, "eta": args.eta,
                                 "jaccard": "changed mask vs the previous checkpoint's (same base)"}

    def fill(d):
        with open(os.path.join(d, "report.json"), "w") as f:
            json.dump(_jsonable(report), f, indent=1)
        with open(os.path.join(d, "modules.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        note = _plots(report, d)
        if note:
            print(note, file=sys.stderr)
        tr.save(os.path.join(d, "tracker"))

    check_output(args.out, inputs, args.force)
    atomic_dir(args.out, fill, replace=args.force)
    shutil.rmtree(partial, ignore_errors=True)  # complete: nothing left to resume
    _print_summary(report)
    if args.diagnostics:
        _print_diagnostics(report)
    print(f"wrote {args.out}/report.json, modules.csv, plots and tracker/ ({len(names)} modules × "
          f"{len(ckpts)} checkpoints)")
    return 0


def _print_summary(report):
    by_type = {}
    for m in report["modules"].values():
        by_type.setdefault(m["type"], []).append(m)
    print(f"{'module type':<14}{'n':>4}{'σ1 (last)':>12}{'energy':>9}{'R² step':>9}{'R² metric':>11}{'sparsity':>10}")
    for typ, ms in sorted(by_type.items()):
        def mean(xs):
            xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
            return sum(xs) / len(xs) if xs else float("nan")
        print(f"{typ:<14}{len(ms):>4}{mean([m['sigma'][-1][0] for m in ms]):>12.4g}"
              f"{mean([m['energy'][-1] for m in ms]):>9.3f}{mean([m['r2_step'] for m in ms]):>9.3f}"
              f"{mean([m['r2_metric'] for m in ms]):>11.3f}{mean([m['sparsity'][-1] for m in ms]):>10.3f}")


def _type_means(report, fn):
    """{module type: mean of fn(module) over its layers, NaN/None ignored}."""
    by_type = {}
    for m in report["modules"].values():
        v = fn(m)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_type.setdefault(m["type"], []).append(v)
    return {t: sum(v) / len(v) for t, v in by_type.items()}


def _print_diagnostics(report):
    """The last checkpoint's §3 diagnostics, mean over layers, per module type."""
    cols = [("angle_u_max", "max∠U (°)"), ("angle_v_max", "max∠V (°)"), ("nss", "NSS"),
            ("overlap_princ", "∩princ"), ("overlap_low", "∩low"), ("jaccard_prev", "J prev")]
    means = {c: _type_means(report, lambda m, c=c: m["diagnostics"][-1][c]) for c, _ in cols}
    base_j = _type_means(report, lambda m: m["diagnostics"][-1]["jaccard_baseline"])
    d = report["diagnostics"]
    print(f"\ndiagnostics at the last checkpoint (k={d['k']}, α={d['alpha']}: random overlap = α; "
          "J prev: Jaccard with the previous checkpoint's changed mask, random baseline in brackets)")
    print(f"{'module type':<14}" + "".join(f"{h:>11}" for _, h in cols))
    for typ in sorted(means["nss"]):
        vals = [means[c].get(typ, float("nan")) for c, _ in cols]
        line = f"{typ:<14}" + "".join(f"{v:>11.4g}" for v in vals)
        if typ in base_j:
            line += f" ({base_j[typ]:.3g})"
        print(line)


def _plots(report, d):
    """σ1 over steps per module type; layer × type heatmaps of energy fraction and R²."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'pyrank[plots]')"
    mods = report["modules"]
    types = sorted({m["type"] for m in mods.values()})
    layers = sorted({m["layer"] for m in mods.values()})
    fig, ax = plt.subplots(figsize=(7, 4))
    for typ in types:
        ms = [m for m in mods.values() if m["type"] == typ]
        steps = ms[0]["steps"]
        mean = [sum(m["sigma"][i][0] for m in ms) / len(ms) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", label=typ)
    ax.set_xlabel("step")
    ax.set_ylabel("σ1 of ΔW (mean over layers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "sigma1.png"), dpi=120)
    plt.close(fig)
    heatmaps = [(lambda m: m["energy"][-1], "energy fraction σ1²/‖ΔW‖² (last step)", "energy_heatmap.png", 1),
                (lambda m: m["r2_step"], "R² of û(t) linear in step", "r2_heatmap.png", 1)]
    if "diagnostics" in report:  # per layer: the last checkpoint's overlap with the principal weights
        alpha = report["diagnostics"]["alpha"]
        def princ(m):  # None (JSON for NaN) when nothing changed
            v = m["diagnostics"][-1]["overlap_princ"]
            return None if v is None else v / alpha
        heatmaps.append((princ,
                         "overlap with principal weights ÷ random (last step)", "principal_overlap_heatmap.png", 2))
    for get, title, fn, vmax in heatmaps:
        grid = [[float("nan")] * len(types) for _ in layers]
        for m in mods.values():
            v = get(m)
            grid[layers.index(m["layer"])][types.index(m["type"])] = float("nan") if v is None else v
        fig, ax = plt.subplots(figsize=(1 + 0.8 * len(types), 1 + 0.3 * len(layers)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(d, fn), dpi=120)
        plt.close(fig)
    if "diagnostics" in report:
        panels = [("angle_u_max", "max principal angle, U (°)"), ("nss", "normalized spectral shift"),
                  ("overlap_princ", "overlap with principal weights"), ("overlap_low", "overlap with low-|W0| weights")]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, (key, title) in zip(axes, panels):
            for typ in types:
                ms = [m for m in mods.values() if m["type"] == typ]
                steps = ms[0]["steps"]
                ys = [sum(m["diagnostics"][i][key] for m in ms) / len(ms) for i in range(len(steps))]
                ax.plot(steps, ys, marker=".", label=typ)
            if key.startswith("overlap"):
                ax.axhline(report["diagnostics"]["alpha"], color="gray", ls="--", lw=0.8, label="random")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "diagnostics.png"), dpi=110)
        plt.close(fig)
    return None


def _predict_sharded(world, base, ckpts, names, args, metrics, window):
    """Track and extrapolate each rank's modules; every rank gets the whole Prediction
    (its factors are small: (m + n) floats per module)."""
    from .distributed import shard_by_size
    from .extrapolate import Prediction

    mine = shard_by_size([(n, _numel(base, n)) for n in names], world.size)[world.rank]

    def predict():
        if not mine:
            return None
        tr, _ = _track(base, ckpts, mine, args, metrics)
        try:
            return tr.extrapolate(to_step=args.to_step, target_metric=args.target_metric, window=window,
                                  base=args.base_mode, update=args.update, scale=args.scale)
        except ValueError as exc:
            raise CLIError(str(exc)) from None

    preds = [p for p in _on_ranks(world, predict) if p is not None]
    applies = {p.applies_to for p in preds}
    if len(applies) != 1:
        raise CLIError(f"modules end their windows at different checkpoints "
                       f"({', '.join(f'{a:g}' for a in sorted(applies))}): "
                       "base='last' needs one checkpoint to apply the prediction to")
    factors = {}
    for p in preds:
        factors.update(p.factors)
    return Prediction({n: factors[n] for n in names}, applies.pop(), preds[0].info)


@_in_world
def _cmd_extrapolate(args, world) -> int:
    import torch

    from .distributed import shard_by_size
    from .io import write_hf_dir
    from .io.writers import write_hf_dir_sharded

    base, ckpts, names, metrics, inputs = _prepare(args)
    window = None
    if args.window:
        try:
            lo, hi = (float(x) for x in args.window.split(":"))
        except ValueError:
            raise CLIError(f"--window {args.window!r}: expected A:B") from None
        window = (lo, hi)
        inside = [c for c in ckpts if lo <= c[0] <= hi]  # only the window is read
        if len(inside) < 3:
            raise CLIError(f"--window {args.window} holds {len(inside)} checkpoint(s); AlphaRL needs at least 3 "
                           f"(checkpoint steps: {', '.join(f'{c[0]:g}' for c in ckpts)})")
        ckpts = inside
    if args.target_metric is not None and not metrics:
        raise CLIError("--target-metric needs --metrics")
    pred = _predict_sharded(world, base, ckpts, names, args, metrics, window)
    if pred.applies_to is None:
        src, src_path = base, args.base
    else:
        _, src_path, src = next(c for c in ckpts if c[0] == pred.applies_to)
    info = dict(pred.info, base_path=os.path.abspath(args.base), applied_to=os.path.abspath(src_path),
                dtype=args.dtype, modules=names,
                checkpoints=[{"step": s, "path": os.path.abspath(p)} for s, p, _ in ckpts])
    dtype = torch.float32 if args.dtype == "float32" else None
    merged = pred.apply(src, dtype=dtype, backend=args.backend)
    kw = dict(base_dir=src_path if os.path.isdir(src_path) else args.base, inputs=inputs, force=args.force,
              modified=names, extra_files={"pyrank_extrapolation.json": _jsonable(info)},
              config_dtype="float32" if dtype is not None else None)
    if world.distributed:  # each rank writes its share of the tensors, rank 0 the index
        mine = shard_by_size([(n, _numel(src, n)) for n in src], world.size)[world.rank]
        prog = _Progress(len(mine), f"writing (rank {world.rank})")
        write_hf_dir_sharded(args.out, merged, mine, world, progress=lambda i, n, name: prog.step(name), **kw)
        if world.rank != 0:
            return 0
    else:
        prog = _Progress(len(src), "writing")
        write_hf_dir(args.out, merged, progress=lambda i, n, name: prog.step(name), **kw)
    if "warning" in pred.info:
        print(f"pyrank: warning: {pred.info['warning']}", file=sys.stderr)
    print(f"wrote {args.out}: {len(names)} modules predicted ({pred.info['mode']} mode, base={args.base_mode}, "
          f"update={args.update}, {args.dtype}), applied to {src_path}")
    return 0


def _cmd_reconstruct(args) -> int:
    from .extrapolate import Overlay, rank_k_reconstruction
    from .io import write_hf_dir
    from .io.writers import check_output

    if args.rank < 1:
        raise CLIError(f"--rank must be >= 1, got {args.rank}")
    _check_numbers(args)
    _check_writable(args.out)
    dev = _device(args)
    base, ck = _open(args.base, dev), _open(args.checkpoint, dev)
    check_output(args.out, [args.base, args.checkpoint], args.force)
    names = _modules(base, args)
    try:
        _check_series(base, [(0.0, args.checkpoint, ck)], names, args.rank)
    except CLIError as exc:
        raise CLIError(str(exc).replace("--k ", "--rank ")) from None

    def recon(n):
        try:
            return rank_k_reconstruction(base[n], ck[n], k=args.rank, scale=args.scale,
                                         norm_match=not args.no_norm_match, backend=args.backend)
        except ValueError as exc:
            raise CLIError(f"{args.checkpoint}: module {n!r}: {exc}") from None

    rest, rest_path = (base, args.base) if args.rest == "base" else (ck, args.checkpoint)
    prog = _Progress(len(rest), "reconstructing")
    write_hf_dir(args.out, Overlay(rest, names, recon), base_dir=rest_path if os.path.isdir(rest_path) else None,
                 inputs=[args.base, args.checkpoint], force=args.force, modified=names,
                 extra_files={"pyrank_reconstruction.json": {"rank": args.rank, "scale": args.scale,
                                                             "norm_match": not args.no_norm_match,
                                                             "rest": args.rest, "modules": names}},
                 progress=lambda i, n, name: prog.step(name))
    print(f"wrote {args.out}: rank-{args.rank} reconstruction of {len(names)} modules, every other tensor "
          f"from the {args.rest}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, algo=args.algo, quick=args.quick, force=args.force)
    return 0


def _cmd_env(args) -> int:
    from .env import report

    print(report())
    return 0


_signalled = []  # the termination signals received (see main)


def _terminate(signum, frame):
    # SIGTERM (kill, a scheduler's time limit) and SIGINT unwind the stack: the atomic
    # writers' cleanup runs and no temporary directory is left behind. Recorded as well:
    # a signal that lands inside a native call (safetensors' reader) may come back wrapped
    # in that library's own error.
    _signalled.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    import threading
    import warnings

    parser = _build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handlers = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if main_thread else {}
    _signalled.clear()
    with warnings.catch_warnings():
        if not args.debug:  # warnings as one line, like the errors
            warnings.showwarning = lambda message, *a, **k: print(f"pyrank: warning: {message}", file=sys.stderr)
        try:
            return args.func(args)
        except (KeyboardInterrupt, SystemExit) as exc:
            if args.debug or not _signalled:
                raise
            return _interrupted(args, 130 if isinstance(exc, KeyboardInterrupt) else exc.code)
        except Exception as exc:
            from .io import PyrankIOError
            from .ops import BackendUnavailable

            if _signalled and not args.debug:  # a signal, wrapped in a library's error on the way up
                return _interrupted(args, 128 + _signalled[0])
            if int(os.environ.get("RANK", "0")) != 0 and not args.debug:
                return 2  # under torchrun every rank fails alike; rank 0 says why
            if args.debug or not isinstance(exc, (CLIError, PyrankIOError, BackendUnavailable)):
                if args.debug:
                    raise
                print(f"pyrank: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                      file=sys.stderr)
                return 2
            print(f"pyrank: error: {exc}", file=sys.stderr)
            return 2
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)


def _interrupted(args, code) -> int:
    hint = " (`pyrank analyze ... --resume` continues it)" if args.command == "analyze" else ""
    print(f"pyrank: interrupted; no output was written{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
