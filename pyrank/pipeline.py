"""The library pipeline: a checkpoint series in, an analysis, a prediction or a rank-k model
out — what the ``pyrank`` command runs, callable from Python (the demo, notebooks, other
tools) without going through argv.

    from pyrank import pipeline
    series = pipeline.open_series("base/", run_dir="run/", metrics="acc.csv")
    result = pipeline.analyze_run(series, pipeline.AnalyzeOptions(k=1, diagnostics=True))
    pipeline.write_analysis(result, "report/")
    pred = pipeline.extrapolate_run(series, pipeline.ExtrapolateOptions(to_step=1000, window=(0, 400)))
    pipeline.write_extrapolation(pred, series, "predicted/")

Every function checks its inputs before reading a weight and raises :class:`PipelineError`
(one line naming the file, tensor or option) or :class:`pyrank.io.PyrankIOError`. Under
``torchrun`` pass ``world=pyrank.distributed.World.from_env()``: the modules are split
across the ranks by size, results meet on rank 0 (the other ranks get None), and an error
on any rank is raised on every rank.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "PipelineError", "Series", "open_series", "checkpoint_list", "read_metrics", "resolve_device",
    "AnalyzeOptions", "Analysis", "analyze_run", "write_analysis", "partial_dir", "RESUME_INTERRUPTED",
    "ExtrapolateOptions", "Extrapolation", "extrapolate_run", "write_extrapolation",
    "ReconstructOptions", "reconstruct_run", "WatchOptions", "watch_run",
]


class PipelineError(Exception):
    """Bad input found by the pipeline; the message is one line naming what is wrong."""


_signals: List[int] = []  # termination signals a caller's handler has seen (note_signal)


def note_signal(signum: int) -> None:
    """Record a termination signal (the CLI's handler calls this). An error that follows is
    then taken for the interruption it is — a signal that lands inside a native call may
    come back wrapped in that library's error — and an interrupted analysis keeps its
    finished checkpoints for a resume."""
    _signals.append(signum)


def signals() -> List[int]:
    return list(_signals)


# ------------------------------------------------------------------ the series


@dataclass
class Series:
    """An opened, checked checkpoint series: lazy weights, the selected modules (2-D floating
    matrices every checkpoint has with the base's shape and dtype) and the metric values."""

    base_path: str
    base: Mapping
    checkpoints: List[Tuple[float, str, Mapping]]  # (step, path, weights), sorted by step
    modules: List[str]
    metrics: Dict[float, float] = field(default_factory=dict)
    run_dir: Optional[str] = None

    @property
    def steps(self) -> List[float]:
        return [s for s, _, _ in self.checkpoints]

    @property
    def inputs(self) -> List[str]:
        """Every path the series reads (an output may be none of them, nor inside one)."""
        return [self.base_path] + [p for _, p, _ in self.checkpoints] + ([self.run_dir] if self.run_dir else [])


def checkpoint_list(checkpoints: Sequence[str] = (), *, run_dir: Optional[str] = None,
                    steps: Optional[Sequence[float]] = None, hf_repo: Optional[str] = None,
                    revisions: str = "*", hf_cache: Optional[str] = None) -> List[Tuple[float, str]]:
    """[(step, path)] sorted by step: the checkpoints of ``run_dir``, the cached revisions of Hub
    repo ``hf_repo`` whose names match ``revisions`` (:func:`pyrank.io.hub.hub_revisions`), or
    the given paths with ``steps`` (default: each path's step from its name or
    trainer_state.json)."""
    from .io import find_checkpoints

    if sum(bool(x) for x in (run_dir, checkpoints, hf_repo)) > 1:
        raise PipelineError("give one of CHECKPOINTS, --run-dir and --hf-repo")
    if hf_repo:
        from .io.hub import hub_revisions

        series = [(float(s), p) for s, p in hub_revisions(hf_repo, revisions, hf_cache)]
    elif run_dir:
        series = [(float(s), p) for s, p in find_checkpoints(run_dir)]
    else:
        if not checkpoints:
            raise PipelineError("no checkpoints: give CHECKPOINTS, --run-dir or --hf-repo")
        for c in checkpoints:
            if not os.path.exists(c):
                raise PipelineError(f"{c}: no such file or directory")
        if steps is not None:
            if len(steps) != len(checkpoints):
                raise PipelineError(f"--steps has {len(steps)} values for {len(checkpoints)} checkpoints")
            steps = [float(s) for s in steps]
        else:
            from .io.readers import step_of

            steps = []
            for c in checkpoints:
                st = step_of(c)
                if st is None:
                    raise PipelineError(f"{c}: cannot tell its step from the name or trainer_state.json; "
                                        "pass --steps")
                steps.append(float(st))
        series = sorted(zip(steps, checkpoints))
    seen = {}
    for st, path in series:
        if st in seen:
            raise PipelineError(f"{path} and {seen[st]} are both step {st:g}")
        seen[st] = path
    return series


def read_metrics(path: str, steps: Sequence[float]) -> Dict[float, float]:
    """{step: value} from a CSV (step,value) or JSON ({step: value} or [{step, value}]) file.
    Repeated steps and steps no checkpoint has are errors; non-finite values are dropped
    with a warning."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not a metrics file (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror})") from None
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
        raise PipelineError(f"{path}: not a metrics file (CSV step,value or JSON step→value): {exc}") from None
    metrics = {}
    for step, value in pairs:
        if step in metrics:
            raise PipelineError(f"{path}: step {step:g} appears twice ({metrics[step]:g} and {value:g})")
        metrics[step] = value
    bad = sorted(s for s, v in metrics.items() if not math.isfinite(v))
    if bad:
        _say(f"pyrank: warning: {path}: ignoring non-finite values at step(s) {', '.join(f'{s:g}' for s in bad)}")
        metrics = {s: v for s, v in metrics.items() if math.isfinite(v)}
    unknown = sorted(set(metrics) - set(steps))
    if unknown:
        raise PipelineError(f"{path}: step {unknown[0]:g} matches no checkpoint (checkpoint steps: "
                            f"{', '.join(f'{s:g}' for s in steps)})")
    return metrics


def resolve_device(device: str = "auto"):
    """'auto' is the current CUDA device when there is one (the Triton kernels then run on the
    GPU), else the CPU. Weights are read to the CPU and moved one tensor at a time."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    return torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def _open(path, device, opened: Optional[Mapping] = None):
    """``path``'s weights (``opened``: already opened by the caller) on ``device``."""
    from .io import open_weights
    from .io.readers import OnDevice

    w = open_weights(path) if opened is None else opened
    return OnDevice(w, device) if device.type != "cpu" else w


def shape_of(weights: Mapping, name: str):
    """(shape, torch dtype name) of a tensor, from the file header when the mapping can."""
    if hasattr(weights, "shape_dtype"):
        return weights.shape_dtype(name)
    t = weights[name]
    return tuple(t.shape), str(t.dtype)


def _numel(weights, name):
    return math.prod(shape_of(weights, name)[0])


def select(base: Mapping, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> List[str]:
    """The modules of ``base``: the default selection with ``include``/``exclude`` applied,
    2-D tensors only (others the selection matched are skipped aloud)."""
    from .io import select_modules

    matched = select_modules(list(base), list(include), list(exclude))
    names = [n for n in matched if len(shape_of(base, n)[0]) == 2]
    skipped = [n for n in matched if n not in set(names)]
    if skipped:
        _say(f"pyrank: note: skipping {len(skipped)} selected tensor(s) that are not 2-D matrices: "
             f"{', '.join(skipped[:3])}{', …' if len(skipped) > 3 else ''}")
    if not names:
        raise PipelineError(f"{getattr(base, 'source', 'base')}: no module selected (default: attention/MLP "
                            "projections of the repeated blocks; use --include REGEX)")
    return names


_FLOAT_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32", "torch.float64")


def check_series(base: Mapping, ckpts, names: Sequence[str], k: Optional[int] = None, what: str = "--k") -> None:
    """Every module is a floating matrix with at least ``k`` rows and columns, and every
    checkpoint has it with the base's shape and dtype (read headers only)."""
    want = {n: shape_of(base, n) for n in names}
    src = getattr(base, "source", "base")
    for n, (shape, dtype) in want.items():
        if str(dtype) not in _FLOAT_DTYPES:
            raise PipelineError(f"{src}: module {n!r} is {dtype}; pyrank analyzes bfloat16, float16, float32 or "
                                "float64 weights (use --exclude to leave it out)")
        if k is not None and k > min(shape):
            raise PipelineError(f"{what} {k} exceeds the smaller side of module {n!r} {list(shape)}; the largest "
                                f"{what} every selected module allows is {min(min(s) for s, _ in want.values())}")
    for step, path, w in ckpts:
        for n in names:
            if n not in w:
                raise PipelineError(f"{path}: missing module {n!r} (present in the base)")
            got = shape_of(w, n)
            if got != want[n]:
                (s1, d1), (s0, d0) = got, want[n]
                raise PipelineError(f"{path}: module {n!r} is {list(s1)} {d1}, the base has {list(s0)} {d0}")


def open_series(base: str, checkpoints: Sequence[str] = (), *, run_dir: Optional[str] = None,
                steps: Optional[Sequence[float]] = None, metrics: Union[str, Mapping, None] = None,
                include: Sequence[str] = (), exclude: Sequence[str] = (), device: str = "auto",
                k: Optional[int] = None, hf_repo: Optional[str] = None, revisions: str = "*",
                hf_cache: Optional[str] = None) -> Series:
    """Open and check a series: the base, its checkpoints (paths, ``run_dir``, or the cached
    revisions of Hub repo ``hf_repo`` matching ``revisions``), the
    modules (``include``/``exclude`` regexes on the default selection), and the metrics (a
    file, or a mapping step → value). ``k``: also check every module has ≥ k rows and
    columns. Only headers are read."""
    dev = resolve_device(device)
    base_w = _open(base, dev)
    listed = checkpoint_list(checkpoints, run_dir=run_dir, steps=steps, hf_repo=hf_repo, revisions=revisions,
                             hf_cache=hf_cache)
    if isinstance(metrics, str):
        metrics = read_metrics(metrics, [s for s, _ in listed])
    metrics = {float(s): float(v) for s, v in (metrics or {}).items()}
    names = select(base_w, include, exclude)
    ckpts = [(s, p, _open(p, dev)) for s, p in listed]
    check_series(base_w, ckpts, names, k)
    return Series(base, base_w, ckpts, names, metrics, run_dir)


# ------------------------------------------------------------------ tracking


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Progress:
    """A tqdm progress bar on stderr: items done, and with ``total_bytes`` the bytes read,
    throughput and ETA by bytes (the work of a series is its reads). Silent with ``quiet``
    or when stderr is not a terminal (logs and pipes get no progress lines)."""

    def __init__(self, total, label, quiet=False, *, total_bytes=0, unit=""):
        from tqdm import tqdm

        self.total, self.done, self.by_bytes = total, 0, total_bytes > 0
        disable = quiet or not sys.stderr.isatty()
        if self.by_bytes:
            self.bar = tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, disable=disable, dynamic_ncols=True, leave=True)
        else:
            self.bar = tqdm(total=total, desc=label, unit="", file=sys.stderr, disable=disable,
                            dynamic_ncols=True, leave=True)
        self.unit = unit

    def step(self, what="", nbytes=0):
        self.done += 1
        if self.bar.disable:
            return
        self.bar.set_postfix_str(f"{self.done}/{self.total} {self.unit and '(' + self.unit + ') '}{what[-48:]}",
                                 refresh=False)
        self.bar.update(nbytes if self.by_bytes else 1)

    def close(self):
        self.bar.close()


@contextlib.contextmanager
def _writing(source, names, label, quiet):
    """A progress bar over the tensors ``names`` of ``source`` as they are written; yields
    the writers' ``progress(i, n, name)`` callback."""
    prog = _Progress(len(names), label, quiet, total_bytes=sum(_nbytes(source, n) for n in names),
                     unit="tensors")
    try:
        yield lambda i, n, name: prog.step(name, _nbytes(source, name))
    finally:
        prog.close()


RESUME_INTERRUPTED = "\0interrupted"  # resume= the interrupted analysis of this output


def partial_dir(out: str) -> str:
    """Where an analysis keeps what it has finished, checkpoint by checkpoint, until it
    completes: a hidden sibling of ``out``."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def _part_order(d: str) -> int:
    tail = d.rsplit("-part-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _resumed(resume, out, k, series: Series):
    """The tracker to continue (None without one), checked against this run: the same k,
    modules of this selection with the base's shapes, steps of this series (the weights
    behind each observation are compared as they are read, in :func:`_track`)."""
    from .track import Rank1Tracker

    if not resume:
        return None
    if resume == RESUME_INTERRUPTED:
        src = partial_dir(out)
        parts = sorted(os.path.join(src, d) for d in os.listdir(src)
                       if not d.startswith(".")) if os.path.isdir(src) else []  # (not a writer's temporary)
        parts = [d for d in parts if os.path.exists(os.path.join(d, "tracker.json"))]
        if not parts:
            raise PipelineError(f"--resume: no interrupted analysis of {out} to continue "
                                "(give --resume TRACKER_DIR to continue a saved tracker)")
        try:  # parts in the order they were saved: a later part's observations and warm starts win
            loaded = Rank1Tracker.union([Rank1Tracker.load(d) for d in sorted(parts, key=_part_order)])
        except (OSError, ValueError) as exc:
            raise PipelineError(f"--resume: {exc}") from None
        where = src
    else:
        try:
            loaded = Rank1Tracker.load(resume)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{resume}: not a saved pyrank tracker ({exc})") from None
        where = resume
    if loaded.k != k:
        raise PipelineError(f"{where}: the tracker has k={loaded.k}, but --k is {k}")
    names, steps = series.modules, series.steps
    extra = [n for n in loaded.modules if n not in set(names)]
    if extra:
        raise PipelineError(f"{where}: the tracker holds {len(extra)} module(s) this base and selection do not "
                            f"have (e.g. {extra[0]!r}): it belongs to another model or run")
    have = ", ".join(f"{s:g}" for s in steps)
    for n in loaded.modules:
        if tuple(loaded._shapes[n]) != tuple(shape_of(series.base, n)[0]):
            raise PipelineError(f"{where}: module {n!r} is {list(loaded._shapes[n])} in the tracker but "
                                f"{list(shape_of(series.base, n)[0])} in the base: it belongs to another model")
        lost = [s for s in loaded.steps(n) if s not in set(steps)]
        if lost:
            raise PipelineError(f"{where}: the tracker has step {lost[0]:g}, which this series lacks "
                                f"(checkpoint steps: {have})")
    return loaded


# An interrupted analysis keeps what it finished: after a module's series is done, its
# observations are saved as a part once this many seconds have passed since the last part
# (so a resume redoes at most that much work, and saving never dominates a fast series).
SAVE_EVERY_S = 2.0


def _nbytes(weights, name) -> int:
    if hasattr(weights, "nbytes"):
        return weights.nbytes(name)
    shape, dtype = shape_of(weights, name)
    import torch

    return math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype.split(".")[1])).element_size()


def _fingerprint_of(weights, name) -> str:
    """The provenance fingerprint of a tensor (:func:`pyrank.track.fingerprint`), reading
    only its first and last rows where the mapping can."""
    from .track import fingerprint, fingerprint_rows

    if not hasattr(weights, "rows"):
        return fingerprint(weights[name])
    shape, dtype = shape_of(weights, name)
    rows = shape[0] if shape else 1
    return fingerprint_rows(shape, dtype, weights.rows(name, 0, 1), weights.rows(name, rows - 1, rows))


def _track(series: Series, ckpts, names, k, backend, extras=None, resumed=None, partial=None, quiet=False):
    """Track every module over the checkpoints, one module at a time: its base is read once
    for the whole series, each checkpoint's tensor once, and a background thread reads the
    next tensors while the current one is computed (at most READ_AHEAD tensors ahead, so
    memory stays a few modules whatever the model's size).

    ``extras``: None, or the AnalyzeOptions whose sparsity (always) and diagnostics (if
    asked) are computed per module and step. The sparsity is the changed count of the SVD's
    first read where that count is the η rule (bf16, η ≤ 2⁻⁹: see
    :func:`pyrank.analysis.count_is_eta_rule`), else a pass of its own. ``resumed``: a
    tracker whose observations are kept (each checked against the fingerprint of the weights
    it claims to come from, read from their first and last rows). ``partial``: a path
    prefix under which finished modules are saved as parts (what a resume continues from).
    Returns (tracker, {module: {step: {column: value}}})."""
    import time

    from .analysis import count_is_eta_rule, diagnostics, update_jaccard, update_sparsity
    from .backends import serial_small_ops
    from .io.readers import BufferPool, LazyWeights, read_tensor
    from .linalg import FUSED_WARM_MAX, default_oversample, svd_lowrank
    from .track import Rank1Tracker, _fmt, fingerprint

    base, metrics = series.base, series.metrics
    # A solve whose block is a few columns is a few bandwidth-bound kernel passes and many
    # tiny torch ops: those run on one thread, the kernels on all (backends.serial_small_ops)
    small_ops = serial_small_ops if k + default_oversample(k) <= FUSED_WARM_MAX else contextlib.nullcontext
    tr = Rank1Tracker(k=k, backend=backend)
    if resumed is not None:  # continue a saved tracker: its observations are kept, the rest are added
        tr = Rank1Tracker.merged([resumed], order=[n for n in names if n in resumed.modules])
        tr.backend = backend
    diag = extras is not None and extras.diagnostics
    per = {n: {} for n in names}

    def kept(n, step):
        return n in tr.modules and step in tr.steps(n)

    def counted(n):  # the fused count serves as the sparsity of this module
        return extras is not None and count_is_eta_rule(shape_of(base, n)[1], extras.eta)

    # what to read, in order: the whole tensor where it is computed on, else (a kept
    # observation) only the rows its fingerprint needs
    plan = []
    for n in names:
        whole = [diag or not kept(n, s) or (extras is not None and not (
            counted(n) and tr._obs[n][s].changed is not None)) for s, _, _ in ckpts]
        plan.append((n, any(whole), whole))
    jobs = []
    for n, any_whole, whole in plan:
        jobs.append((base, n, any_whole))
        jobs.extend((w, n, wh) for (_, _, w), wh in zip(ckpts, whole))
    total = sum(_nbytes(w, n) for w, n, wh in jobs if wh)
    prog = _Progress(len(names) * len(ckpts), "tracking", quiet, total_bytes=total,
                     unit=f"{len(names)} modules × {len(ckpts)} checkpoints")
    # read into reused buffers (BufferPool: above glibc's 32 MB mmap threshold a fresh
    # buffer's page faults cost more than the copy); what the loop holds at once — base,
    # checkpoint, the previous one, READ_AHEAD + 1 queued — fits
    pool = BufferPool(keep=READ_AHEAD + 5)

    def job(w, n, wh):
        """What the read-ahead thread does for one tensor; returns what hands it over."""
        if not wh:
            fp = _fingerprint_of(w, n)
            return lambda: fp
        if isinstance(w, LazyWeights):
            # The math runs on the CPU here, and a copy on the read-ahead thread would take a
            # core and memory bandwidth from the kernels' threads (measured on a 6-layer 1.5B
            # series, warm, 2 cores: kernels 1.9 s with the copies overlapped, 1.1 s without;
            # analyze 4.2 → 3.8 s). So that thread only asks the OS for the bytes, and they are
            # copied when wanted: warm, that copy is all; cold, the disk works ahead meanwhile.
            w.prefetch(n)
            return lambda: read_tensor(w, n, pool)
        t = read_tensor(w, n, pool)  # other formats, and tensors moved to a GPU: read ahead whole
        return lambda: t

    reader = _Reader([functools.partial(job, w, n, wh) for w, n, wh in jobs])
    pending, last_save = [], -math.inf

    def save_part():
        nonlocal pending, last_save
        if partial is not None and pending:
            tr.save(f"{partial}-part-{time.time_ns():020d}", modules=pending)
        pending, last_save = [], time.monotonic()

    try:
        for n, any_whole, whole in plan:
            W0 = reader.next()()  # (its fingerprint alone where nothing is computed on it)
            base_svd, prev, new, first = None, None, False, any_whole
            for (step, path, w), wh in zip(ckpts, whole):
                W = reader.next()()
                try:
                    if not kept(n, step):
                        with small_ops():
                            ob = tr.observe(step, {n: W}, {n: W0}, modules=[n])[n]
                        new = True
                    else:  # a resumed observation: it must come from these very weights
                        ob, fp = tr._obs[n][step], tr.fingerprints(n)
                        for what, key, got in (("base", "base", W0), (path, _fmt(step), W)):
                            if key in fp and fp[key] != (got if isinstance(got, str) else fingerprint(got)):
                                raise PipelineError(f"--resume: module {n!r} of {what} is not what the tracker's "
                                                    f"step {step:g} was computed from: it belongs to another run")
                    if diag:
                        if base_svd is None:  # W₀'s top-k serves every checkpoint
                            base_svd = svd_lowrank(W0, min(extras.diag_k, *W0.shape), tol=1e-6, backend=backend)
                        d = diagnostics(W0, W, extras.diag_k, extras.alpha, extras.eta, base_svd=base_svd,
                                        backend=backend)
                        j, jb = update_jaccard(W0, prev, W, extras.eta) if prev is not None else (None, None)
                        # the diagnostics counted the changed weights already: no second read for the sparsity
                        per[n][step] = dict({"sparsity": 1.0 - d["changed_fraction"]}, **d, jaccard_prev=j,
                                            jaccard_baseline=jb)
                        prev = W
                    elif extras is not None:
                        numel = math.prod(shape_of(base, n)[0])
                        per[n][step] = {"sparsity": (1.0 - ob.changed / numel if numel else 1.0)
                                        if counted(n) and ob.changed is not None
                                        else update_sparsity(W0, W, extras.eta)}
                except ValueError as exc:
                    raise PipelineError(f"{path}: {exc}") from None
                prog.step(n, (_nbytes(w, n) if wh else 0) + (_nbytes(base, n) if first else 0))
                first = False
            if new:
                pending.append(n)
                if time.monotonic() - last_save >= SAVE_EVERY_S:
                    save_part()
        save_part()
    finally:
        reader.close()
        prog.close()
    for step, _, _ in ckpts:
        if step in metrics:
            tr.set_metric(step, metrics[step])
    return tr, per


READ_AHEAD = 2  # tensors a series read runs ahead of the computation


class _Reader:
    """Runs read jobs in order on one background thread, at most READ_AHEAD ahead of
    :meth:`next`, which returns the job's result. File reads (and the OS's reads ahead) release
    the GIL, so they overlap computing on the current tensor; an error surfaces at the
    :meth:`next` that wanted its tensor."""

    def __init__(self, jobs):
        from concurrent.futures import ThreadPoolExecutor

        self._jobs = iter(jobs)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyrank-read")
        self._ahead = []
        for _ in range(READ_AHEAD + 1):
            self._submit()

    def _submit(self):
        job = next(self._jobs, None)
        if job is not None:
            self._ahead.append(self._pool.submit(job))

    def next(self):
        fut = self._ahead.pop(0)
        self._submit()
        return fut.result()

    def close(self):
        for f in self._ahead:
            f.cancel()
        self._ahead = []
        self._pool.shutdown(wait=True)


def _single():
    from .distributed import World

    return World()


def _on_ranks(world, fn):
    """Run ``fn()`` on every rank and gather its result; an error on any rank becomes the
    same PipelineError on every rank (so no rank waits forever for the others)."""
    def describe(exc):
        msg = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        return f"rank {world.rank}: {msg}"

    results, err = world.on_all(fn, describe)
    if err:
        raise PipelineError(err)
    return results


def _mine(world, series: Series):
    from .distributed import shard_by_size

    return shard_by_size([(n, _numel(series.base, n)) for n in series.modules], world.size)[world.rank]


# ------------------------------------------------------------------ analyze


def _check_options(options, positive=(), finite=()) -> None:
    """Counts ≥ 1 and finite numbers (None: not given), named as the command's options."""
    for opt in positive:
        if getattr(options, opt) < 1:
            raise PipelineError(f"--{opt} must be >= 1, got {getattr(options, opt)}")
    for opt in finite:
        v = getattr(options, opt)
        if v is not None and not math.isfinite(v):
            raise PipelineError(f"--{opt.replace('_', '-')} must be a finite number, got {v}")


@dataclass
class AnalyzeOptions:
    """What ``pyrank analyze`` computes. ``resume``: None, a saved tracker's directory, or
    :data:`RESUME_INTERRUPTED` (this output's interrupted analysis, see :func:`partial_dir`)."""

    k: int = 1
    backend: str = "auto"
    diagnostics: bool = False
    diag_k: int = 16
    alpha: float = 0.05
    eta: float = 1e-3
    resume: Optional[str] = None
    quiet: bool = False

    def check(self):
        _check_options(self, positive=("k",), finite=("alpha", "eta"))
        if self.diagnostics and not (self.diag_k >= 1 and 0 < self.alpha < 1):
            raise PipelineError(f"--diag-k must be >= 1 and --alpha in (0, 1); got {self.diag_k} and {self.alpha}")


@dataclass
class Analysis:
    """An analyzed series: ``report`` (what report.json holds, before NaN → null), ``rows``
    (modules.csv, one per module and step) and the ``tracker`` (resumable)."""

    report: dict
    rows: List[dict]
    tracker: object


def analyze_run(series: Series, options: Optional[AnalyzeOptions] = None, *, out: Optional[str] = None,
                world=None) -> Optional[Analysis]:
    """Track the top-k triplets of every module over the series; with ``options.diagnostics``
    the spectral and sparsity diagnostics of docs/METHODS.md §3 too. ``out``: the output it
    will be written to, which names the directory where each finished checkpoint is kept
    until the analysis completes (so an interrupted one can be resumed with
    ``resume=RESUME_INTERRUPTED``). Returns the analysis on rank 0, None on other ranks."""
    options = options or AnalyzeOptions()
    options.check()
    world = world or _single()
    partial = partial_dir(out) if out is not None else None
    resuming_partial = options.resume == RESUME_INTERRUPTED
    if resuming_partial and out is None:
        raise PipelineError("resuming an interrupted analysis needs its output path (out=)")
    if partial is not None and world.rank == 0 and not resuming_partial and os.path.isdir(partial):
        _say(f"pyrank: note: starting over; the interrupted analysis of {out} is discarded "
             "(pass --resume to continue it instead)")
        shutil.rmtree(partial, ignore_errors=True)
    world.all_gather(None)  # a barrier: no rank saves a part before rank 0 has cleared the old ones
    resumed = _resumed(options.resume, out, options.k, series)
    prefix = None if partial is None else os.path.join(partial, f"rank{world.rank:05d}")

    def track(names):
        return _track(series, series.checkpoints, names, options.k, options.backend, options, resumed, prefix,
                      options.quiet)

    try:
        if not world.distributed:
            tr, per = track(series.modules)
        else:
            parts = _on_ranks(world, lambda: track(_mine(world, series)))
            if world.rank != 0:
                return None
            from .track import Rank1Tracker

            tr = Rank1Tracker.merged([t for t, _ in parts], order=series.modules)
            per = {}
            for _, p in parts:
                per.update(p)
    except Exception:
        # an error (an interruption raises BaseException instead) in a fresh analysis: its
        # parts are of no use to anyone; a resumed one keeps them for a corrected command
        if partial is not None and not resuming_partial and world.rank == 0 and not _signals:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return _build_report(series, options, tr, per)


def _build_report(series: Series, options: AnalyzeOptions, tr, per) -> Analysis:
    from .report import layer_type

    names = series.modules
    report = {"base": os.path.abspath(series.base_path), "k": options.k, "eta": options.eta,
              "checkpoints": [{"step": s, "path": os.path.abspath(p)} for s, p, _ in series.checkpoints],
              "metrics": {f"{s:g}": v for s, v in series.metrics.items()}, "selected_modules": names,
              "modules": {}}
    rows = []
    for n in names:
        h = tr.history(n)
        layer, typ = layer_type(n)
        r2s, r2m, r2mh = tr.r2_step(n), tr.r2_metric(n), tr.r2_metric(n, vector="u_hat")
        report["modules"][n] = {
            "layer": layer, "type": typ, "shape": list(shape_of(series.base, n)[0]), "steps": h["steps"],
            "sigma": h["sigma"].tolist(), "fro": h["fro"].tolist(), "energy": h["energy"].tolist(),
            "drift_u": h["drift_u"].tolist(), "drift_v": h["drift_v"].tolist(),
            "sparsity": [per[n][s]["sparsity"] for s in h["steps"]], "r2_step": r2s, "r2_metric": r2m,
            "r2_metric_uhat": r2mh,
            "passes": h["passes"], "converged": bool((h["residual"] <= tr.tol).all()),
        }
        if options.diagnostics:
            report["modules"][n]["diagnostics"] = [
                {c: v for c, v in per[n][s].items() if c != "sparsity"} for s in h["steps"]]
        for i, s in enumerate(h["steps"]):
            row = {"module": n, "layer": layer, "type": typ, "step": s}
            row.update({f"sigma_{j + 1}": float(h["sigma"][i, j]) for j in range(h["sigma"].shape[1])})
            row.update(fro=float(h["fro"][i]), energy=float(h["energy"][i]), drift_u=float(h["drift_u"][i]),
                       drift_v=float(h["drift_v"][i]), r2_step=r2s, r2_metric=r2m, r2_metric_uhat=r2mh)
            row.update(per[n][s])
            rows.append(row)
    if options.diagnostics:
        report["diagnostics"] = {"k": options.diag_k, "alpha": options.alpha, "eta": options.eta,
                                 "jaccard": "changed mask vs the previous checkpoint's (same base)"}
    return Analysis(report, rows, tr)


def write_analysis(analysis: Analysis, out: str, *, force: bool = False, inputs: Sequence[str] = ()) -> None:
    """report.json, modules.csv, the plots and tracker/ as directory ``out``, atomically
    (never over an existing ``out`` without ``force``, never into an input); then the
    analysis' kept parts (see :func:`partial_dir`) are removed: it is complete."""
    from .io.writers import atomic_dir, check_output, write_json
    from .report import jsonable, plots

    def fill(d):
        write_json(os.path.join(d, "report.json"), jsonable(analysis.report))
        with open(os.path.join(d, "modules.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(analysis.rows[0]))
            wr.writeheader()
            wr.writerows(analysis.rows)
        note = plots(analysis.report, d)
        if note:
            _say(note)
        analysis.tracker.save(os.path.join(d, "tracker"))

    check_output(out, inputs, force)
    atomic_dir(out, fill, replace=force)
    shutil.rmtree(partial_dir(out), ignore_errors=True)


# ------------------------------------------------------------------ watch


@dataclass
class WatchOptions:
    """Following a run while it trains (:func:`watch_run`): the analysis' ``k``/``backend``/
    ``eta``; ``interval`` seconds between looks at the run directory; a checkpoint is taken
    once its files parse whole and have not changed for ``settle`` seconds (and, in a verl
    run, once ``latest_checkpointed_iteration.txt`` has reached its step); ``idle_exit``:
    stop after that many seconds without a new checkpoint (None: only on Ctrl-C/SIGTERM)."""

    k: int = 1
    backend: str = "auto"
    eta: float = 1e-3
    interval: float = 30.0
    settle: float = 10.0
    idle_exit: Optional[float] = None
    quiet: bool = False

    def check(self):
        _check_options(self, positive=("k",), finite=("eta", "interval", "settle"))
        if self.interval <= 0 or self.settle < 0 or (self.idle_exit is not None and not self.idle_exit > 0):
            raise PipelineError("--interval must be > 0, --settle >= 0 and --idle-exit > 0")


VERL_MARKER = "latest_checkpointed_iteration.txt"  # verl writes it once a checkpoint is saved whole


def _candidates(run_dir: str) -> List[Tuple[float, str]]:
    from .io import PyrankIOError, find_checkpoints

    try:
        return [(float(s), p) for s, p in find_checkpoints(run_dir)]
    except PyrankIOError:
        if not os.path.isdir(run_dir):
            raise
        return []  # none yet


def _files_of(weights, path) -> List[str]:
    files = getattr(weights, "_files", None)
    if isinstance(files, dict):
        return sorted(set(files.values()))
    return sorted(files) if files else [path]


class _Settled:
    """Which checkpoints of a run are complete: their weights open and check whole (index,
    every shard, every tensor's bytes inside its file), the framework's marker (verl's
    latest iteration) has reached them, and their files' sizes and times have not moved for
    ``settle`` seconds. A checkpoint still being written fails one of the three."""

    def __init__(self, run_dir: str, settle: float):
        self.run_dir, self.settle, self.seen = run_dir, settle, {}
        self.opened: Dict[str, Mapping] = {}  # path → its weights as last opened (reused once settled)

    def __call__(self, step: float, path: str) -> bool:
        import time

        from .io import PyrankIOError, open_weights

        marker = os.path.join(self.run_dir, VERL_MARKER)
        if os.path.exists(marker):
            try:
                with open(marker) as f:
                    if step > float(f.read().strip() or "-inf"):
                        return False
            except (OSError, ValueError):
                return False  # being rewritten
        try:
            self.opened[path] = w = open_weights(path)
            stamp = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in _files_of(w, path))
        except (PyrankIOError, OSError):
            self.seen.pop(path, None)
            self.opened.pop(path, None)
            return False
        now = time.monotonic()
        first = self.seen.get(path)
        if first is None or first[0] != stamp:
            self.seen[path] = (stamp, now)
            return self.settle == 0
        return now - first[1] >= self.settle


def watch_run(base: str, run_dir: str, out: str, options: Optional[WatchOptions] = None, *,
              include: Sequence[str] = (), exclude: Sequence[str] = (), device: str = "auto",
              force: bool = False, on_update=None) -> Optional[Analysis]:
    """Follow a training run: analyze each new checkpoint of ``run_dir`` as soon as it is
    complete (see :class:`_Settled`), warm-started from the last, and rewrite ``out``
    (report.json, modules.csv, plots, tracker/) after each — atomically, so ``out`` always
    holds a whole report. Returns the last analysis when ``idle_exit`` passes; an
    interruption (KeyboardInterrupt, SystemExit) propagates with ``out`` intact.
    ``on_update(analysis)`` is called after each write."""
    import time

    from .io.writers import check_output

    options = options or WatchOptions()
    options.check()
    dev = resolve_device(device)
    base_w = _open(base, dev)
    names = select(base_w, include, exclude)
    check_series(base_w, [], names, options.k)
    inputs = [base, run_dir]
    check_output(out, inputs, force)
    aopts = AnalyzeOptions(k=options.k, backend=options.backend, eta=options.eta, quiet=options.quiet)
    settled = _Settled(run_dir, options.settle)
    done: List[Tuple[float, str, Mapping]] = []
    tr, per, result = None, {n: {} for n in names}, None
    last_new = time.monotonic()
    while True:
        seen = {s for s, _, _ in done}
        fresh = [(s, p) for s, p in _candidates(run_dir) if s not in seen and settled(s, p)]
        for step, path in fresh:
            # (the headers _Settled checked, unchanged since: its stamp covers every file)
            ckpt = (step, path, _open(path, dev, settled.opened.pop(path, None)))
            check_series(base_w, [ckpt], names, options.k)
            series = Series(base, base_w, sorted(done + [ckpt], key=lambda c: c[0]), names, {}, run_dir)
            tr, new = _track(series, [ckpt], names, options.k, options.backend, aopts, tr, None, options.quiet)
            for n in names:
                per[n].update(new[n])
            done = series.checkpoints
            result = _build_report(series, aopts, tr, per)
            write_analysis(result, out, force=force or len(done) > 1, inputs=inputs)
            if not options.quiet:
                _say(f"pyrank watch: step {step:g} analyzed ({len(done)} checkpoint(s)); {out} updated")
            if on_update is not None:
                on_update(result)
            last_new = time.monotonic()
        if options.idle_exit is not None and time.monotonic() - last_new >= options.idle_exit:
            return result
        time.sleep(options.interval)


# ------------------------------------------------------------------ extrapolate


@dataclass
class ExtrapolateOptions:
    """AlphaRL's prediction (docs/METHODS.md §1): exactly one of ``to_step`` and
    ``target_metric``; ``window`` (first, last) step, inclusive (None: every checkpoint);
    ``base``/``update``/``scale`` as :meth:`pyrank.Rank1Tracker.extrapolate`; ``dtype``
    "float32" (as the reference code writes its model) or "same" (each tensor's dtype)."""

    to_step: Optional[float] = None
    target_metric: Optional[float] = None
    window: Optional[Tuple[float, float]] = None
    base: str = "last"
    update: str = "official"
    scale: float = 1.0
    dtype: str = "float32"
    k: int = 1
    backend: str = "auto"
    quiet: bool = False

    def check(self):
        _check_options(self, positive=("k",), finite=("to_step", "target_metric", "scale"))
        if (self.to_step is None) == (self.target_metric is None):
            raise PipelineError("give exactly one of --to-step and --target-metric")
        if self.dtype not in ("float32", "same"):
            raise PipelineError(f"dtype must be 'float32' or 'same', got {self.dtype!r}")


@dataclass
class Extrapolation:
    """A prediction and the weights it applies to (W₀, or the last window checkpoint)."""

    prediction: object
    source_path: str
    source: Mapping
    checkpoints: List[Tuple[float, str, Mapping]]  # the window's
    options: ExtrapolateOptions


def extrapolate_run(series: Series, options: ExtrapolateOptions, *, world=None) -> Extrapolation:
    """Fit every module's rank-1 trajectory over the window and predict its update. Every
    rank gets the whole prediction (its factors are small: (m + n) floats per module)."""
    from .extrapolate import Prediction

    options.check()
    world = world or _single()
    ckpts = series.checkpoints
    if options.window is not None:
        lo, hi = options.window
        inside = [c for c in ckpts if lo <= c[0] <= hi]  # only the window is read
        if len(inside) < 3:
            raise PipelineError(f"--window {lo:g}:{hi:g} holds {len(inside)} checkpoint(s); AlphaRL needs at least 3 "
                                f"(checkpoint steps: {', '.join(f'{c[0]:g}' for c in ckpts)})")
        ckpts = inside
    if options.target_metric is not None and not series.metrics:
        raise PipelineError("--target-metric needs --metrics")
    mine = _mine(world, series)

    def predict():
        if not mine:
            return None
        tr, _ = _track(series, ckpts, mine, options.k, options.backend, quiet=options.quiet)
        try:
            return tr.extrapolate(to_step=options.to_step, target_metric=options.target_metric,
                                  window=options.window, base=options.base, update=options.update,
                                  scale=options.scale)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None

    preds = [p for p in _on_ranks(world, predict) if p is not None]
    applies = {p.applies_to for p in preds}
    if len(applies) != 1:
        raise PipelineError(f"modules end their windows at different checkpoints "
                            f"({', '.join(f'{a:g}' for a in sorted(applies))}): "
                            "base='last' needs one checkpoint to apply the prediction to")
    factors = {}
    for p in preds:
        factors.update(p.factors)
    info = dict(preds[0].info)
    frozen = [n for p in preds for n in p.info.get("frozen", [])]
    if frozen:
        info["frozen"] = frozen
    pred = Prediction({n: factors[n] for n in series.modules}, applies.pop(), info)
    if pred.applies_to is None:
        src, src_path = series.base, series.base_path
    else:
        _, src_path, src = next(c for c in ckpts if c[0] == pred.applies_to)
    return Extrapolation(pred, src_path, src, ckpts, options)


def write_extrapolation(x: Extrapolation, series: Series, out: str, *, force: bool = False, world=None) -> None:
    """The predicted model as a loadable HF directory ``out`` (atomically; under torchrun
    every rank writes its share of the tensors, rank 0 the index), with
    pyrank_extrapolation.json saying how it was made."""
    import torch

    from .distributed import shard_by_size
    from .io import write_hf_dir
    from .io.writers import write_hf_dir_sharded
    from .report import jsonable

    world = world or _single()
    pred, opts = x.prediction, x.options
    info = dict(pred.info, base_path=os.path.abspath(series.base_path), applied_to=os.path.abspath(x.source_path),
                dtype=opts.dtype, modules=series.modules,
                checkpoints=[{"step": s, "path": os.path.abspath(p)} for s, p, _ in x.checkpoints])
    dtype = torch.float32 if opts.dtype == "float32" else None
    merged = pred.apply(x.source, dtype=dtype, backend=opts.backend)
    src_dir = x.source_path if os.path.isdir(x.source_path) else series.base_path
    kw = dict(base_dir=src_dir, inputs=series.inputs, force=force, modified=series.modules,
              extra_files={"pyrank_extrapolation.json": jsonable(info)},
              config_dtype="float32" if dtype is not None else None)
    if world.distributed:  # each rank writes its share of the tensors, rank 0 the index
        mine = shard_by_size([(n, _numel(x.source, n)) for n in x.source], world.size)[world.rank]
        with _writing(x.source, mine, f"writing (rank {world.rank})", opts.quiet) as step:
            write_hf_dir_sharded(out, merged, mine, world, progress=step, **kw)
    else:
        with _writing(x.source, list(x.source), "writing", opts.quiet) as step:
            write_hf_dir(out, merged, progress=step, **kw)


# ------------------------------------------------------------------ reconstruct


@dataclass
class ReconstructOptions:
    """The rank-k dominance model (docs/METHODS.md §1): ``rank``, λ = ``scale``, α norm-matched
    unless ``norm_match`` is False; ``rest`` "base" (AlphaRL's reference code) or
    "checkpoint" says where every tensor that is not reconstructed comes from."""

    rank: int = 1
    scale: float = 1.0
    norm_match: bool = True
    rest: str = "base"
    backend: str = "auto"
    quiet: bool = False

    def check(self):
        _check_options(self, positive=("rank",), finite=("scale",))
        if self.rest not in ("base", "checkpoint"):
            raise PipelineError(f"rest must be 'base' or 'checkpoint', got {self.rest!r}")


def reconstruct_run(base: str, checkpoint: str, out: str, options: Optional[ReconstructOptions] = None, *,
                    include: Sequence[str] = (), exclude: Sequence[str] = (), device: str = "auto",
                    force: bool = False) -> List[str]:
    """Write W₀ + λ·α·U_k S_k V_kᵀ for every module of ``checkpoint`` as a loadable HF
    directory ``out``; returns the module names."""
    from .extrapolate import Overlay, rank_k_reconstruction
    from .io import write_hf_dir
    from .io.writers import check_output

    options = options or ReconstructOptions()
    options.check()
    dev = resolve_device(device)
    base_w, ck = _open(base, dev), _open(checkpoint, dev)
    check_output(out, [base, checkpoint], force)
    names = select(base_w, include, exclude)
    check_series(base_w, [(0.0, checkpoint, ck)], names, options.rank, what="--rank")

    def recon(n):
        try:
            return rank_k_reconstruction(base_w[n], ck[n], k=options.rank, scale=options.scale,
                                         norm_match=options.norm_match, backend=options.backend)
        except ValueError as exc:
            raise PipelineError(f"{checkpoint}: module {n!r}: {exc}") from None

    rest, rest_path = (base_w, base) if options.rest == "base" else (ck, checkpoint)
    with _writing(rest, list(rest), "reconstructing", options.quiet) as step:
        write_hf_dir(out, Overlay(rest, names, recon), base_dir=rest_path if os.path.isdir(rest_path) else None,
                     inputs=[base, checkpoint], force=force, modified=names,
                     extra_files={"pyrank_reconstruction.json": {"rank": options.rank, "scale": options.scale,
                                                                 "norm_match": options.norm_match,
                                                                 "rest": options.rest, "modules": names}},
                     progress=step)
    return names
