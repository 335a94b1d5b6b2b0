"""``Rank1Callback``: pyrank's tracking inside a ``transformers.Trainer`` (and TRL trainers,
which subclass it). Importing this module imports transformers; ``import pyrank`` does not.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("pyrank.integrations.transformers needs transformers: pip install 'pyrank[transformers]'"
                      ) from exc

from .tracking import TrainingTracker

logger = logging.getLogger("pyrank")

__all__ = ["Rank1Callback"]


class Rank1Callback(TrainerCallback):
    """Track the top-k triplets of every module's update W_t − W₀ while a Trainer trains.

    W₀ is snapshotted at ``on_train_begin`` (so resuming from a checkpoint makes the
    resumed weights the base — pass ``base_state_dict`` to keep the original one); the
    live weights are observed every ``every_n_steps`` optimizer steps and at every
    ``on_save``, with no disk round-trip. At each save the tracker is written to
    ``<output_dir>/pyrank_tracker/`` (rank 0), where ``pyrank analyze --resume`` and
    ``Rank1Tracker.load`` continue from it.

    AlphaRL mode: with ``extrapolate_at=S`` and ``to_step=T``, at step S (observed first)
    the rank-1 trajectory of every module over the steps observed so far (at least 3) is
    extrapolated linearly in the step to T and merged into the live weights: W_S + λ·û*·v₁ᵀ
    as AlphaRL's reference code does (``update="official"``), or W_S + λ·(û* − û(S))·v₁ᵀ
    (``update="growth"``, see :meth:`pyrank.Rank1Tracker.extrapolate`); the event is logged
    and recorded in ``self.events``. The optimizer's moments are left as they are.

    Args:
        every_n_steps: observation period in optimizer steps (None: only at saves).
        k, tol, include, exclude, base_device, backend: see :class:`TrainingTracker`.
        extrapolate_at, to_step, scale, update: AlphaRL mode (both steps or neither); λ = ``scale``.
        tracker_dir: where to save the tracker (default ``<output_dir>/pyrank_tracker``).
    """

    def __init__(self, every_n_steps: Optional[int] = None, *, k: int = 1, tol: float = 1e-4,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), base_device: str = "cpu",
                 backend: str = "auto", extrapolate_at: Optional[int] = None, to_step: Optional[int] = None,
                 scale: float = 1.0, update: str = "official", tracker_dir: Optional[str] = None,
                 base_state_dict=None):
        if (extrapolate_at is None) != (to_step is None):
            raise ValueError("AlphaRL mode needs both extrapolate_at= and to_step= (or neither)")
        if extrapolate_at is not None and to_step <= extrapolate_at:
            raise ValueError(f"to_step ({to_step}) must be after extrapolate_at ({extrapolate_at})")
        if update not in ("official", "growth"):
            raise ValueError(f"update must be 'official' or 'growth', got {update!r}")
        self.tracking = TrainingTracker(k=k, tol=tol, every_n_steps=every_n_steps, include=include,
                                        exclude=exclude, base_device=base_device, backend=backend)
        self.extrapolate_at, self.to_step, self.scale, self.update = extrapolate_at, to_step, float(scale), update
        self.tracker_dir, self._base_sd = tracker_dir, base_state_dict
        self.events: list = []

    @property
    def tracker(self):
        """The underlying :class:`pyrank.Rank1Tracker` (complete on rank 0)."""
        return self.tracking.tracker

    def _dir(self, args):
        return self.tracker_dir or os.path.join(args.output_dir, "pyrank_tracker")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracking.base is None:
            self.tracking.snapshot_base(self._base_sd if self._base_sd is not None else model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.tracking.every_n_steps is not None:  # None here means: only at saves
            self.tracking.step(model, step)
        if self.extrapolate_at is not None and step == self.extrapolate_at:
            self._extrapolate(model, step)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not self.tracking.observed(step):
            self.tracking.step(model, step, force=True)
        self.tracking.save(self._dir(args))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.tracking.is_main and self.tracker.modules:
            self.tracking.save(self._dir(args))
        return control

    def _extrapolate(self, model, step):
        tr = self.tracking
        if not tr.observed(step):
            tr.step(model, step, force=True)
        n = len(tr.observed_steps)  # every rank knows it, so every rank raises alike
        if n < 3:
            raise ValueError(f"AlphaRL at step {step}: {n} observations so far, at least 3 are needed "
                             "(lower every_n_steps)")
        pred = (tr.tracker.extrapolate(to_step=self.to_step, base="last", update=self.update, scale=self.scale)
                if tr.is_main else None)
        tr.apply_prediction(model, pred)
        event = {"step": step, "to_step": self.to_step, "scale": self.scale, "update": self.update,
                 "modules": len(tr.modules)}
        self.events.append(event)
        logger.warning("pyrank: AlphaRL at step %d: replaced %d modules' weights by their rank-1 prediction "
                       "for step %d (λ=%g)", step, len(tr.modules), self.to_step, self.scale)
