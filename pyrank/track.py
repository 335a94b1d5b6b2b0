"""Streaming rank-k tracking of weight updates across checkpoints (docs/METHODS.md §1).

``Rank1Tracker.observe(step, weights, base)`` computes, per module, the top-k SVD of
ΔW = W_step − W_base with :func:`pyrank.svd_lowrank`, warm-started from the module's
previous observation, and records σ, u, v and ‖ΔW‖_F. Everything derived — sign
alignment, drift angles, energy fractions, linearity R², AlphaRL fits and predictions —
is computed from the stored raw results when asked for, so checkpoints may arrive in any
order and a tracker saved and loaded mid-run continues exactly.

Sign alignment (docs/METHODS.md §1): walking the checkpoints from the last to the first,
(u_i, v_i) at step t is flipped when cos(û_i(t), û_i(t+1)) < 0, with û_i = σ_i·u_i; the
last checkpoint keeps the SVD's own sign convention (its largest-magnitude u entry is
positive). Components are aligned by index; two components whose σ cross may swap.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .extrapolate import Factors, Prediction
from .fits import PLS1, line_fit, r2_in_step
from .io.readers import read_json
from .io.writers import atomic_dir, write_json
from .linalg import svd_lowrank

__all__ = ["Rank1Tracker", "Observation"]

_FORMAT = "pyrank.Rank1Tracker/1"


@dataclass
class Observation:
    """One module at one step: the raw SVD result (CPU, float32), ‖ΔW‖_F and the number of
    entries the update changed (W ≠ W₀; None in trackers saved before it was counted)."""

    S: Tensor  # (k,)
    U: Tensor  # (m, k)
    V: Tensor  # (n, k)
    fro: float
    passes: int
    residual: Tensor  # (k,)
    converged: bool
    changed: Optional[int] = None


class Rank1Tracker:
    """Track the top-k singular triplets of every module's update over checkpoints.

    Args:
        k: triplets per module (1 for AlphaRL's rank-1 analysis; k > 1 tracks the top-k
            subspace).
        tol: the SVD's residual tolerance (see :func:`pyrank.svd_lowrank`).
        backend: primitives backend ("auto", "torch", "cpu", "triton").
        seed: the SVD's seed for cold starts.
    """

    def __init__(self, k: int = 1, tol: float = 1e-4, backend: str = "auto", seed: int = 0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k, self.tol, self.backend, self.seed = k, float(tol), backend, int(seed)
        self._obs: Dict[str, Dict[float, Observation]] = {}
        self._metrics: Dict[float, float] = {}
        self._shapes: Dict[str, Tuple[int, int]] = {}
        self._warm: Dict[str, Tuple[Tensor, Tensor]] = {}  # oversampled bases of the last result
        # what each observation was computed from: {module: {"base" or step: fingerprint}},
        # so a resumed analysis can refuse another run's tracker (see fingerprint())
        self._prov: Dict[str, Dict[str, str]] = {}

    # ------------------------------------------------------------ observing

    def observe(self, step, weights: Mapping, base: Mapping, metric: Optional[float] = None,
                *, modules: Optional[Sequence[str]] = None) -> Dict[str, Observation]:
        """Analyze one checkpoint.

        Args:
            step: the checkpoint's training step (int or float; observing a step again
                replaces it).
            weights, base: mappings from module name to 2-D tensor (state dicts, or lazy
                mappings that load one tensor per access). Modules are the 2-D tensors
                present in both (or ``modules``, if given); each is read once.
            metric: the checkpoint's evaluation metric, for AlphaRL's PLS fit.
        Returns the new observations by module.
        """
        step = _step(step)
        names = list(modules) if modules is not None else [n for n in weights if n in base]
        out = {}
        for name in names:
            if name not in weights or name not in base:
                raise KeyError(f"module {name!r} is missing from the "
                               f"{'checkpoint' if name not in weights else 'base'} (step {step:g})")
            W, W0 = weights[name], base[name]
            if modules is None and (W.dim() != 2 or not W.is_floating_point()):
                continue
            if W.shape != W0.shape or W.dtype != W0.dtype:
                raise ValueError(f"module {name!r} at step {step:g} has shape {tuple(W.shape)} "
                                 f"{W.dtype} but the base has {tuple(W0.shape)} {W0.dtype}")
            prev_shape = self._shapes.get(name)
            if prev_shape is not None and prev_shape != tuple(W.shape):
                raise ValueError(f"module {name!r} changed shape: {prev_shape} before, {tuple(W.shape)} "
                                 f"at step {step:g}")
            try:
                res = svd_lowrank(W, self.k, base=W0, init=self._warm.get(name), tol=self.tol,
                                  backend=self.backend, seed=self.seed, fro=True)
                fro = res.fro
            except ValueError as exc:
                raise ValueError(f"module {name!r} at step {step:g}: {exc}") from None
            ob = Observation(res.S.float().cpu(), res.U.float().cpu(), res.V.float().cpu(), fro,
                             res.passes, res.residual.float().cpu(), res.converged, res.nnz)
            self._obs.setdefault(name, {})[step] = ob
            self._shapes[name] = tuple(W.shape)
            self._warm[name] = tuple(t.float().cpu() for t in res.basis)
            prov = self._prov.setdefault(name, {})
            prov["base"], prov[_fmt(step)] = fingerprint(W0), fingerprint(W)
            out[name] = ob
        if metric is not None:
            self._metrics[step] = float(metric)
        return out

    def set_metric(self, step, value: float) -> None:
        """Attach (or replace) the evaluation metric of an observed step."""
        self._metrics[_step(step)] = float(value)

    # ------------------------------------------------------------ reading

    @property
    def modules(self) -> List[str]:
        return list(self._obs)

    def fingerprints(self, module: str) -> Dict[str, str]:
        """{"base": …, step: …}: :func:`fingerprint` of the weights each observation of
        ``module`` was computed from (empty for trackers saved before 0.2)."""
        return dict(self._prov.get(module, {}))

    def steps(self, module: str) -> List[float]:
        return sorted(self._module(module))

    def _module(self, module):
        if module not in self._obs:
            raise KeyError(f"no observations of module {module!r}")
        return self._obs[module]

    def history(self, module: str) -> dict:
        """The module's trajectory, sorted by step and sign-aligned.

        Keys: ``steps`` (T), ``sigma`` (T×k), ``u_hat`` (T×m, σ₁·u₁), ``u`` (T×m×k),
        ``v`` (T×n×k), ``fro`` (T), ``energy`` (T, σ₁²/‖ΔW‖_F²), ``drift_u`` and
        ``drift_v`` (T, radians between u₁ (v₁) and the previous step's; NaN at the
        first), ``flipped`` (T×k, whether alignment flipped the raw vectors), ``passes``,
        ``residual``, ``metric`` (T, NaN where unknown).
        """
        obs = self._module(module)
        steps = sorted(obs)
        U = torch.stack([obs[s].U for s in steps])  # T×m×k
        V = torch.stack([obs[s].V for s in steps])
        S = torch.stack([obs[s].S for s in steps])  # T×k
        flipped = torch.zeros(S.shape, dtype=torch.bool)
        for t in range(len(steps) - 2, -1, -1):  # last to first, as docs/METHODS.md §1
            cos = ((U[t] * S[t]) * (U[t + 1] * S[t + 1])).sum(0)
            flip = cos < 0
            flipped[t] = flip
            sign = torch.where(flip, -1.0, 1.0)
            U[t] *= sign
            V[t] *= sign
        fro = torch.tensor([obs[s].fro for s in steps], dtype=torch.float64)
        s1 = S[:, 0].double()
        energy = torch.where(fro > 0, s1**2 / fro.clamp_min(1e-300) ** 2, torch.zeros_like(fro))
        return {
            "steps": steps,
            "sigma": S,
            "u_hat": U[:, :, 0] * S[:, :1],
            "u": U,
            "v": V,
            "fro": fro,
            "energy": energy,
            "drift_u": _drift(U[:, :, 0], S[:, 0]),
            "drift_v": _drift(V[:, :, 0], S[:, 0]),
            "flipped": flipped,
            "passes": [obs[s].passes for s in steps],
            "residual": torch.stack([obs[s].residual for s in steps]),
            "metric": torch.tensor([self._metrics.get(s, float("nan")) for s in steps], dtype=torch.float64),
        }

    def r2_step(self, module: str) -> float:
        """R² of û(t) fitted linearly in the step (NaN with < 3 checkpoints)."""
        h = self.history(module)
        return r2_in_step(h["steps"], h["u_hat"])

    def r2_metric(self, module: str, vector: str = "u") -> float:
        """AlphaRL's R²: one-component PLS of the metric on the rank-1 trajectory, OLS on the
        score, in sample. ``vector="u"`` (default, as AlphaRL's reference code reports it)
        regresses on the unit, sign-aligned u₁(t); ``"u_hat"`` on û(t) = σ₁(t)·u₁(t), what
        its extrapolation fits. NaN when fewer than 3 observed steps have a metric, or when
        the metric is constant over them or the module never changed (R² is undefined:
        there is nothing to explain, or nothing to explain it with)."""
        if vector not in ("u", "u_hat"):
            raise ValueError(f"vector must be 'u' or 'u_hat', got {vector!r}")
        h = self.history(module)
        keep = ~torch.isnan(h["metric"])
        if int(keep.sum()) < 3 or float(h["metric"][keep].std()) == 0.0:
            return float("nan")
        X = h["u"][:, :, 0] if vector == "u" else h["u_hat"]
        if not bool((h["sigma"][keep, 0] > 0).all()):
            return float("nan")  # a checkpoint equal to the base: u₁ is arbitrary there
        try:
            return PLS1(X[keep], h["metric"][keep].tolist()).r2
        except ValueError:  # no coordinate varies with the metric: nothing explains it
            return float("nan")

    def summary(self) -> List[dict]:
        """One row per module: shape, checkpoints, last σ₁ and energy fraction, mean drift,
        R² in step and vs metric, total passes."""
        rows = []
        for name in self._obs:
            h = self.history(name)
            drift = h["drift_u"][1:]
            rows.append({
                "module": name,
                "shape": self._shapes[name],
                "checkpoints": len(h["steps"]),
                "last_step": h["steps"][-1],
                "sigma1": float(h["sigma"][-1, 0]),
                "fro": float(h["fro"][-1]),
                "energy": float(h["energy"][-1]),
                "mean_drift_u": float(drift.mean()) if drift.numel() else float("nan"),
                "r2_step": self.r2_step(name),
                "r2_metric": self.r2_metric(name),
                "passes": int(sum(h["passes"])),
            })
        return rows

    # ------------------------------------------------------------ AlphaRL

    def extrapolate(self, *, to_step=None, target_metric=None, window=None, base: str = "last",
                    update: str = "official", scale: float = 1.0,
                    modules: Optional[Sequence[str]] = None) -> Prediction:
        """Predict each module's rank-1 update (AlphaRL).

        Exactly one of:
            to_step: fit û(t) by a least-squares line in the step over the window and
                evaluate it at ``to_step`` (metric-free);
            target_metric: fit AlphaRL's PLS model of the metric on û(t) over the window
                and invert it at y* = ``target_metric``.
        window: (first_step, last_step), inclusive; None = every observed step. It must
            hold ≥ 3 checkpoints (with metrics, for ``target_metric``).
        base: the weights the prediction is added to: "last" (W_k, the last window
            checkpoint, as AlphaRL's reference code does) or "initial" (W₀).
        update: what is added, with v₁ = v₁(k) the last window checkpoint's aligned right
            vector and λ = ``scale``:
            "official" — λ·û*·v₁ᵀ, AlphaRL's reference code (AlphaRLBuildPerdictModel.py):
                W = W_k + λ·û*·v₁ᵀ, or W₀ + λ·û*·v₁ᵀ with base="initial";
            "growth" — λ·(û* − û(k))·v₁ᵀ, only with base="last": W_k keeps everything
                learned up to step k and gains only the predicted growth of its rank-1
                part (W_k already holds σ₁u₁v₁ᵀ(k), which "official" adds a second time).
        scale: λ.
        A module whose û never moved over the window (frozen: equal to the base throughout)
        keeps its last û, so its predicted update is what it had (listed in ``info["frozen"]``).
        Returns a :class:`Prediction`; ``applies_to`` is None for base="initial", else the
        step k of the checkpoint it must be applied to.
        """
        if (to_step is None) == (target_metric is None):
            raise ValueError("give exactly one of to_step= or target_metric=")
        if base not in ("initial", "last"):
            raise ValueError(f"base must be 'initial' or 'last', got {base!r}")
        if update not in ("official", "growth"):
            raise ValueError(f"update must be 'official' or 'growth', got {update!r}")
        if update == "growth" and base == "initial":
            raise ValueError("update='growth' adds û* − û(k) to the checkpoint at step k: it needs base='last'")
        for what, x in (("to_step", to_step), ("target_metric", target_metric), ("scale", scale)):
            if x is not None and not math.isfinite(float(x)):
                raise ValueError(f"{what} must be finite, got {x!r}")
        names = list(modules) if modules is not None else self.modules
        if not names:
            raise ValueError("nothing to extrapolate: no module has been observed")
        factors, last_steps, notes, frozen = {}, set(), [], []
        for name in names:
            h = self.history(name)
            idx = [i for i, s in enumerate(h["steps"])
                   if window is None or (window[0] <= s <= window[1])]
            if target_metric is not None:
                idx = [i for i in idx if not math.isnan(float(h["metric"][i]))]
            if len(idx) < 3:
                what = "checkpoints with a metric" if target_metric is not None else "checkpoints"
                have = ", ".join(_fmt(s) for s in h["steps"])
                raise ValueError(f"module {name!r}: the window {_window_str(window)} holds {len(idx)} {what} "
                                 f"(observed steps: {have}); AlphaRL needs at least 3")
            steps = [h["steps"][i] for i in idx]
            X = h["u_hat"][idx].double()
            if target_metric is not None and float(X.std(0).max()) == 0.0:
                u_star = X[-1]  # the trajectory never moved (a frozen module): nothing to extrapolate
                frozen.append(name)
            elif target_metric is not None:
                try:
                    pls = PLS1(X, h["metric"][idx].tolist())
                except ValueError as exc:
                    raise ValueError(f"module {name!r}: {exc}") from None
                u_star = pls.invert(target_metric)
                lo, hi = float(pls.y.min()), float(pls.y.max())
                if not lo - (hi - lo) <= float(target_metric) <= hi + (hi - lo):
                    notes.append(name)
            else:
                a, b = line_fit(steps, X)
                u_star = a + b * float(to_step)
            k_last = idx[-1]
            v1 = h["v"][k_last, :, 0].double()
            u_pred = u_star if update == "official" else u_star - h["u_hat"][k_last].double()
            factors[name] = Factors(u_pred.float()[:, None], torch.ones(1), v1.float()[:, None], float(scale))
            last_steps.add(h["steps"][k_last])
        if base == "last" and len(last_steps) != 1:
            raise ValueError(f"modules end their windows at different steps {sorted(last_steps)}: "
                             "base='last' needs one checkpoint to apply the prediction to")
        info = {"mode": "metric" if target_metric is not None else "step",
                "to_step": to_step, "target_metric": target_metric, "window": list(window) if window else None,
                "base": base, "update": update, "scale": scale, "k": self.k}
        if frozen:
            info["frozen"] = frozen
        if notes:
            info["warning"] = (f"target metric {target_metric:g} lies more than the observed range away from the "
                               f"window's metrics for {len(notes)} module(s): the PLS line is extrapolated far")
        return Prediction(factors, None if base == "initial" else last_steps.pop(), info)

    @classmethod
    def merged(cls, trackers: Sequence["Rank1Tracker"], order: Optional[Sequence[str]] = None) -> "Rank1Tracker":
        """One tracker from trackers of disjoint module sets (e.g. one per rank), with the
        modules in ``order`` (default: as found). Settings come from the first; metrics are
        the union."""
        if not trackers:
            raise ValueError("nothing to merge")
        first = trackers[0]
        out = cls(k=first.k, tol=first.tol, backend=first.backend, seed=first.seed)
        owner = {}
        for tr in trackers:
            if (tr.k, tr.tol) != (first.k, first.tol):
                raise ValueError(f"cannot merge trackers with k/tol {tr.k}/{tr.tol} and {first.k}/{first.tol}")
            for name in tr._obs:
                if name in owner:
                    raise ValueError(f"module {name!r} is in two of the trackers to merge")
                owner[name] = tr
            out._metrics.update(tr._metrics)
        for name in (order if order is not None else list(owner)):
            tr = owner[name]
            out._obs[name], out._shapes[name], out._warm[name] = tr._obs[name], tr._shapes[name], tr._warm[name]
            if name in tr._prov:
                out._prov[name] = tr._prov[name]
        return out

    # ------------------------------------------------------------ persistence

    def save(self, path: str, *, steps: Optional[Sequence[float]] = None,
             modules: Optional[Sequence[str]] = None) -> None:
        """Write the tracker to directory ``path`` (tracker.json + vectors.safetensors, no
        pickle), atomically. :meth:`load` resumes it exactly, warm starts included.
        ``steps``: only these steps' observations (the warm starts and metrics are always
        written) — what an interrupted analysis saves after each checkpoint, so that saving
        stays proportional to the new work; :meth:`union` puts such parts together again.
        ``modules``: likewise, only these modules (with their warm starts)."""
        from safetensors.torch import save_file

        keep = None if steps is None else {_step(s) for s in steps}
        tensors, meta_obs = {}, {}
        for name, per in self._obs.items():
            if modules is not None and name not in modules:
                continue
            meta_obs[name] = {}
            for step, ob in per.items():
                if keep is not None and step not in keep:
                    continue
                key = f"{name}::{_fmt(step)}"
                tensors[key + "::S"], tensors[key + "::U"] = ob.S.contiguous(), ob.U.contiguous()
                tensors[key + "::V"], tensors[key + "::res"] = ob.V.contiguous(), ob.residual.contiguous()
                meta_obs[name][_fmt(step)] = {"fro": ob.fro, "passes": ob.passes, "converged": ob.converged,
                                              "changed": ob.changed}
            wu, wv = self._warm[name]
            # clone: the warm basis may be the very tensors of the last observation (e.g. a
            # zero update), and safetensors refuses to write shared storage twice
            tensors[f"{name}::warm::U"], tensors[f"{name}::warm::V"] = wu.clone(), wv.clone()
        meta = {"format": _FORMAT, "k": self.k, "tol": self.tol, "backend": self.backend, "seed": self.seed,
                "shapes": {n: list(s) for n, s in self._shapes.items() if n in meta_obs},
                "metrics": {_fmt(s): v for s, v in self._metrics.items()}, "observations": meta_obs,
                "provenance": {n: p for n, p in self._prov.items() if n in meta_obs}}

        def fill(d):
            save_file(tensors, os.path.join(d, "vectors.safetensors"))
            write_json(os.path.join(d, "tracker.json"), meta)

        atomic_dir(path, fill)

    @classmethod
    def load(cls, path: str) -> "Rank1Tracker":
        """Load a tracker saved by :meth:`save`. Raises FileNotFoundError without a
        tracker.json, ValueError (naming the file) for anything unreadable or incomplete."""
        from safetensors.torch import load_file

        meta_path = os.path.join(path, "tracker.json")
        vec_path = os.path.join(path, "vectors.safetensors")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path}: not a saved Rank1Tracker (no tracker.json)")
        try:
            meta = read_json(meta_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{meta_path}: unreadable ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        try:
            tensors = load_file(vec_path)
        except Exception as exc:  # missing, truncated or corrupted
            raise ValueError(f"{vec_path}: unreadable ({str(exc).strip()[:120] or type(exc).__name__})") from None
        try:
            tr = cls(k=meta["k"], tol=meta["tol"], backend=meta["backend"], seed=meta["seed"])
            tr._shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
            tr._metrics = {float(s): v for s, v in meta["metrics"].items()}
            tr._prov = meta.get("provenance", {})
            for name, per in meta["observations"].items():
                tr._obs[name] = {}
                for step, d in per.items():
                    key = f"{name}::{step}"
                    tr._obs[name][float(step)] = Observation(
                        tensors[key + "::S"], tensors[key + "::U"], tensors[key + "::V"], d["fro"], d["passes"],
                        tensors[key + "::res"], d["converged"], d.get("changed"))
                tr._warm[name] = (tensors[f"{name}::warm::U"], tensors[f"{name}::warm::V"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: incomplete tracker (missing {exc})") from None
        return tr

    @classmethod
    def union(cls, trackers: Sequence["Rank1Tracker"]) -> "Rank1Tracker":
        """One tracker holding every observation of ``trackers`` (parts saved step by step,
        or by different ranks), in the order given: a later part's observation of the same
        module and step, and its warm start, win. Settings come from the first part."""
        if not trackers:
            raise ValueError("nothing to put together")
        first = trackers[0]
        out = cls(k=first.k, tol=first.tol, backend=first.backend, seed=first.seed)
        for tr in trackers:
            if (tr.k, tr.tol) != (first.k, first.tol):
                raise ValueError(f"cannot combine trackers with k/tol {tr.k}/{tr.tol} and {first.k}/{first.tol}")
            for name, per in tr._obs.items():
                out._obs.setdefault(name, {}).update(per)
                out._shapes[name], out._warm[name] = tr._shapes[name], tr._warm[name]
                out._prov.setdefault(name, {}).update(tr._prov.get(name, {}))
            out._metrics.update(tr._metrics)
        return out


def fingerprint(W: Tensor) -> str:
    """A short hash of a weight's shape, dtype and first and last rows: enough to tell two
    runs' (or two checkpoints') weights apart without reading them again."""
    rows = W.reshape(W.shape[0], -1) if W.dim() else W.reshape(1, 1)
    return fingerprint_rows(tuple(W.shape), str(W.dtype), rows[:1], rows[-1:])


def fingerprint_rows(shape, dtype: str, first: Tensor, last: Tensor) -> str:
    """:func:`fingerprint` from the shape, the dtype's torch name and the first and last rows
    alone (what a reader that can read a row range needs to fetch)."""
    import hashlib

    h = hashlib.sha1(f"{tuple(shape)} {dtype}".encode())
    for r in (first, last):
        h.update(r.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _step(step) -> float:
    try:
        s = float(step)
    except (TypeError, ValueError):
        raise TypeError(f"step must be a number, got {step!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"step must be finite, got {step!r}")
    return s


def _window_str(window) -> str:
    return "(all steps)" if window is None else f"{_fmt(window[0])}:{_fmt(window[1])}"


def _fmt(step: float) -> str:
    return str(int(step)) if float(step).is_integer() else repr(float(step))


def _drift(X: Tensor, sigma: Tensor) -> Tensor:
    """Angle (radians) between consecutive rows' directions; NaN for the first row and
    wherever either step's σ₁ is 0 (an unchanged module: its vectors are arbitrary)."""
    out = torch.full((X.shape[0],), float("nan"), dtype=torch.float64)
    if X.shape[0] > 1:
        a, b = X[:-1].double(), X[1:].double()
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
        ang = torch.arccos(cos.abs().clamp(max=1.0))
        moved = (sigma[:-1] > 0) & (sigma[1:] > 0)
        out[1:] = torch.where(moved, ang, torch.full_like(ang, float("nan")))
    return out
