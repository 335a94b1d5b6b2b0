"""The ``pyrank`` command (also ``python -m pyrank``): arguments in, :mod:`pyrank.pipeline`
calls, exit codes out.

Bad input ends with one line, ``pyrank: error: …`` naming the file or tensor, exit status 2,
no traceback (``--debug`` shows it), and nothing written. SIGINT/SIGTERM end with
``pyrank: interrupted`` and 130/143, nothing half-written.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .pipeline import RESUME_INTERRUPTED, PipelineError

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
    "watch": """examples:
  pyrank watch runs/grpo --base Qwen2.5-1.5B --out watch-report
  pyrank watch runs/grpo --base Qwen2.5-1.5B --out watch-report --interval 60 --idle-exit 3600
Stops on Ctrl-C (or SIGTERM, or --idle-exit); the report is rewritten atomically after each
checkpoint, so it is whole whenever it stops.""",
}


CLIError = PipelineError  # (the one-line error class, for arguments the parser cannot check)


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
        sp.add_argument("--hf-repo", metavar="ORG/NAME",
                        help="a series kept as revisions of one Hub repo, read from the local Hugging Face cache "
                             "(never downloaded); the step is the last number in each revision's name")
        sp.add_argument("--revisions", default="*", metavar="GLOB",
                        help="with --hf-repo: the revisions (branches, tags) to read, e.g. 'step_*' (default all)")
        sp.add_argument("--hf-cache", metavar="DIR", help="with --hf-repo: the cache directory (default: "
                                                          "huggingface_hub's, HF_HUB_CACHE)")
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
        quiet_arg(sp)

    def quiet_arg(sp):
        sp.add_argument("--quiet", action="store_true",
                        help="no progress bar (none is drawn when stderr is not a terminal either)")

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
    a.add_argument("--resume", metavar="TRACKER_DIR", nargs="?", const=RESUME_INTERRUPTED,
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
    quiet_arg(r)
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
    quiet_arg(d)
    d.set_defaults(func=_cmd_demo)

    wa = sub.add_parser("watch", help="follow a training run: analyze each checkpoint as soon as it is complete",
                        description="Analyze every checkpoint of RUN_DIR, then wait for new ones and analyze "
                                    "each once it is complete (its files parse whole and have settled; in a "
                                    "verl run, once latest_checkpointed_iteration.txt has reached it), "
                                    "warm-started from the last; report.json, modules.csv, plots and tracker/ "
                                    "in --out are rewritten after each.", epilog=EXAMPLES["watch"],
                        formatter_class=fmt)
    wa.add_argument("run_dir", help="the training run's output directory (checkpoint-N/, global_step_N/actor/"
                                    "huggingface/ or global_stepN_hf/ folders)")
    wa.add_argument("--base", required=True, help="the base model (before RL)")
    wa.add_argument("--out", required=True, help="report directory (must not exist, unless --force)")
    wa.add_argument("--k", type=int, default=1, help="singular triplets per module (default 1)")
    wa.add_argument("--eta", type=float, default=1e-3, help="as in analyze (default 1e-3)")
    wa.add_argument("--include", action="append", default=[], metavar="REGEX")
    wa.add_argument("--exclude", action="append", default=[], metavar="REGEX")
    wa.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    wa.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    wa.add_argument("--interval", type=float, default=30.0, help="seconds between looks at RUN_DIR (default 30)")
    wa.add_argument("--settle", type=float, default=10.0,
                    help="seconds a checkpoint's files must stay unchanged before it is read (default 10)")
    wa.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                    help="stop after this long without a new checkpoint (default: run until Ctrl-C)")
    wa.add_argument("--force", action="store_true", help="replace an existing --out")
    quiet_arg(wa)
    wa.set_defaults(func=_cmd_watch)

    env = sub.add_parser("env", help="print versions and which backends are available (and why not)",
                         description="Print versions, devices, CPU features and the status of every backend.",
                         epilog=EXAMPLES["env"], formatter_class=fmt)
    env.set_defaults(func=_cmd_env)
    return p


# ------------------------------------------------------------------ commands


def _window(text):
    if not text:
        return None
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise CLIError(f"--window {text!r}: expected A:B") from None
    return lo, hi


def _steps(text):
    if not text:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise CLIError(f"--steps {text!r}: not a comma-separated list of numbers") from None


def _check_writable(out):
    """The output's parent must exist (or be creatable) and be writable, before any compute."""
    probe = os.path.dirname(os.path.abspath(out)) or "."
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{out}: cannot write there ({probe} is not a writable directory)")


def _open_series(args, options):
    """Options checked, the output location and the series checked, before any weight is read."""
    from . import pipeline
    from .io.writers import check_output

    options.check()
    _check_writable(args.out)
    series = pipeline.open_series(args.base, args.checkpoints, run_dir=args.run_dir, steps=_steps(args.steps),
                                  metrics=args.metrics, include=args.include, exclude=args.exclude,
                                  device=args.device, k=args.k, hf_repo=args.hf_repo, revisions=args.revisions,
                                  hf_cache=args.hf_cache)
    check_output(args.out, series.inputs, args.force)
    if args.debug:  # which reader each input got
        for what, w in [(args.base, series.base)] + [(p, w) for _, p, w in series.checkpoints]:
            print(f"pyrank: debug: {what}: {getattr(w, 'layout', type(w).__name__)}", file=sys.stderr)
    return series


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
    from . import pipeline, report

    options = pipeline.AnalyzeOptions(k=args.k, backend=args.backend, diagnostics=args.diagnostics,
                                      diag_k=args.diag_k, alpha=args.alpha, eta=args.eta, resume=args.resume,
                                      quiet=args.quiet)
    series = _open_series(args, options)
    result = pipeline.analyze_run(series, options, out=args.out, world=world)
    if world.rank != 0:
        return 0
    pipeline.write_analysis(result, args.out, force=args.force, inputs=series.inputs)
    report.print_summary(result.report)
    if args.diagnostics:
        report.print_diagnostics(result.report)
    print(f"wrote {args.out}/report.json, modules.csv, plots and tracker/ ({len(series.modules)} modules × "
          f"{len(series.checkpoints)} checkpoints)")
    return 0


@_in_world
def _cmd_extrapolate(args, world) -> int:
    from . import pipeline

    options = pipeline.ExtrapolateOptions(to_step=args.to_step, target_metric=args.target_metric,
                                          window=_window(args.window), base=args.base_mode, update=args.update,
                                          scale=args.scale, dtype=args.dtype, k=args.k, backend=args.backend,
                                          quiet=args.quiet)
    series = _open_series(args, options)
    x = pipeline.extrapolate_run(series, options, world=world)
    pipeline.write_extrapolation(x, series, args.out, force=args.force, world=world)
    if world.rank != 0:
        return 0
    info = x.prediction.info
    if "warning" in info:
        print(f"pyrank: warning: {info['warning']}", file=sys.stderr)
    print(f"wrote {args.out}: {len(series.modules)} modules predicted ({info['mode']} mode, base={args.base_mode}, "
          f"update={args.update}, {args.dtype}), applied to {x.source_path}")
    return 0


def _cmd_reconstruct(args) -> int:
    from . import pipeline

    options = pipeline.ReconstructOptions(rank=args.rank, scale=args.scale, norm_match=not args.no_norm_match,
                                          rest=args.rest, backend=args.backend, quiet=args.quiet)
    options.check()
    _check_writable(args.out)
    names = pipeline.reconstruct_run(args.base, args.checkpoint, args.out, options, include=args.include,
                                     exclude=args.exclude, device=args.device, force=args.force)
    print(f"wrote {args.out}: rank-{args.rank} reconstruction of {len(names)} modules, every other tensor "
          f"from the {args.rest}")
    return 0


def _cmd_watch(args) -> int:
    from . import pipeline

    options = pipeline.WatchOptions(k=args.k, backend=args.backend, eta=args.eta, interval=args.interval,
                                    settle=args.settle, idle_exit=args.idle_exit, quiet=args.quiet)
    options.check()
    _check_writable(args.out)
    last = {}
    try:
        pipeline.watch_run(args.base, args.run_dir, args.out, options, include=args.include, exclude=args.exclude,
                           device=args.device, force=args.force, on_update=lambda a: last.update(a=a))
    except (KeyboardInterrupt, SystemExit):
        if not pipeline.signals():
            raise
    n = len(last["a"].report["checkpoints"]) if last else 0
    print(f"pyrank watch: stopped; {args.out} holds the report of {n} checkpoint(s)" if n else
          f"pyrank watch: stopped before any checkpoint was complete; nothing written to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, algo=args.algo, quick=args.quick, force=args.force, quiet=args.quiet)
    return 0


def _cmd_env(args) -> int:
    from .env import report

    print(report())
    return 0


def _terminate(signum, frame):
    # SIGTERM (kill, a scheduler's time limit) and SIGINT unwind the stack: the atomic
    # writers' cleanup runs and no temporary directory is left behind
    from .pipeline import note_signal

    note_signal(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    import threading
    import warnings

    from .pipeline import signals

    parser = _build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handlers = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if main_thread else {}
    seen = len(signals())
    with warnings.catch_warnings():
        if not args.debug:  # warnings as one line, like the errors
            warnings.showwarning = lambda message, *a, **k: print(f"pyrank: warning: {message}", file=sys.stderr)
        try:
            code = args.func(args)
            sys.stdout.flush()  # (a reader that has gone shows here, not in the flush at exit)
            return code
        except (KeyboardInterrupt, SystemExit) as exc:
            if args.debug or len(signals()) == seen:
                raise
            return _interrupted(args, 130 if isinstance(exc, KeyboardInterrupt) else exc.code)
        except BrokenPipeError:
            # whoever read our output stopped (`pyrank analyze … | head`; pyrank writes to no
            # other pipe): analyze, extrapolate and reconstruct print once their files are written
            # (and every writer is atomic), so end quietly, as `cat` does, with stdout pointed at
            # /dev/null for the interpreter's flush at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 128 + getattr(signal, "SIGPIPE", 13)
        except Exception as exc:
            from .io import PyrankIOError
            from .ops import BackendUnavailable

            if len(signals()) > seen and not args.debug:  # a signal, wrapped in a library's error
                return _interrupted(args, 128 + signals()[-1])
            if int(os.environ.get("RANK", "0")) != 0 and not args.debug:
                return 2  # under torchrun every rank fails alike; rank 0 says why
            if args.debug or not isinstance(exc, (PipelineError, PyrankIOError, BackendUnavailable)):
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
