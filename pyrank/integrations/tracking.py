"""Tracking a live model's update, with no disk round-trip.

Wrapped models: ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers
are unwrapped (every rank holds the full weights; rank 0 does the analysis). Sharded
models — FSDP (``FullyShardedDataParallel``) and FSDP2/DTensor parameters — are gathered
with ``torch.distributed.checkpoint``'s full state dict, offloaded to the CPU of rank 0
only; every rank must call :meth:`TrainingTracker.step` (it is a collective there), and
only rank 0 analyzes.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..io.select import select_modules
from ..track import Rank1Tracker

logger = logging.getLogger("pyrank")

__all__ = ["TrainingTracker", "unwrap_model", "full_weights"]


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def _multi_process() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def _from_rank0(obj):
    """``obj`` as rank 0 has it, on every rank (itself without torch.distributed)."""
    if not _multi_process():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (FSDP is kept: its
    parameters are gathered by :func:`full_weights`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _is_sharded(model: nn.Module) -> bool:
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_weights(model: nn.Module) -> Optional[Dict[str, Tensor]]:
    """Name → full parameter tensor (detached; no copy for an unsharded model) on rank 0,
    None on the other ranks. For a sharded model this is a collective: every rank must call
    it; GPU shards are gathered into a CPU copy on rank 0 only."""
    model = unwrap_model(model)
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # GPU shards are gathered into rank 0's CPU memory. CPU shards are gathered without
        # the offload option: with CPU tensors FSDP1's offload path segfaults (torch 2.13).
        on_gpu = any(p.is_cuda for p in model.parameters())
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
        return sd if _rank() == 0 else None
    if _rank() != 0:
        return None
    return {n: p.detach() for n, p in model.named_parameters()}


class TrainingTracker:
    """Streaming rank-k tracking of a model's update W_t − W₀ during training.

    Args:
        k, tol, backend, seed: passed to :class:`pyrank.Rank1Tracker`.
        every_n_steps: :meth:`step` observes when ``step % every_n_steps == 0`` (or when
            ``force=True``); None → every call observes.
        include, exclude: regexes on parameter names, as the CLI's ``--include``/``--exclude``;
            the default selection is the attention/MLP projections of the repeated blocks.
        base_device: where the base snapshot lives: "cpu" (default; frees accelerator
            memory) or "same" (the parameter's device; faster products on a GPU).

    Call :meth:`snapshot_base` once before training (or let the first :meth:`step` do it:
    a step without a base takes the snapshot and observes nothing).
    """

    def __init__(self, *, k: int = 1, tol: float = 1e-4, every_n_steps: Optional[int] = None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), base_device: str = "cpu",
                 backend: str = "auto", seed: int = 0):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if base_device not in ("cpu", "same"):
            raise ValueError(f"base_device must be 'cpu' or 'same', got {base_device!r}")
        self.tracker = Rank1Tracker(k=k, tol=tol, backend=backend, seed=seed)
        self.every_n_steps, self.base_device = every_n_steps, base_device
        self.include, self.exclude = list(include), list(exclude)
        self.base: Optional[Dict[str, Tensor]] = None
        self.modules: list = []
        self.is_main = _rank() == 0
        self._steps: set = set()

    def snapshot_base(self, model) -> None:
        """Copy the selected weights as W₀: from a model or from a state dict (a mapping
        name → tensor, read on rank 0). Under torch.distributed every rank must call it:
        rank 0 keeps the base, and every rank learns the module list."""
        if isinstance(model, Mapping):
            w = model if _rank() == 0 else None
        else:
            w = full_weights(model)
        self.is_main = w is not None
        names = None
        if w is not None:
            names = select_modules(list(w), self.include, self.exclude, shapes=lambda n: tuple(w[n].shape))
        names = _from_rank0(names)  # every rank learns the module list (apply_prediction iterates it)
        if not names:
            raise ValueError("no parameter selected (default: attention/MLP projections of the repeated "
                             "blocks); pass include=[regex]")
        if w is None:
            self.modules, self.base = names, {}
            return
        dev = (lambda t: torch.device("cpu")) if self.base_device == "cpu" else (lambda t: t.device)
        self.modules = names
        self.base = {n: w[n].detach().to(dev(w[n]), copy=True) for n in names}

    def step(self, model: nn.Module, step, *, metric: Optional[float] = None, force: bool = False):
        """Observe the model at training step ``step`` if it is due (see ``every_n_steps``).

        Returns the new observations (module → Observation) on rank 0, else None."""
        if self.base is None:
            self.snapshot_base(model)
            return None
        due = force or self.every_n_steps is None or int(step) % self.every_n_steps == 0
        if not due:
            return None
        w = full_weights(model)
        self._steps.add(float(step))  # on every rank, so every rank agrees on what was observed
        if w is None:
            return None
        out = {}
        with torch.no_grad():
            for n in self.modules:  # one module at a time: a CPU base visits the GPU tensor by tensor
                W, W0 = w[n], self.base[n]
                out.update(self.tracker.observe(step, {n: W}, {n: W0.to(W.device, non_blocking=True)},
                                                metric=metric, modules=[n]))
        logger.info("pyrank: observed %d modules at step %s (%d SVD passes)", len(out), step,
                    sum(o.passes for o in out.values()))
        return out

    def observed(self, step) -> bool:
        """Whether step ``step`` has been observed (every rank answers alike)."""
        return float(step) in self._steps

    @property
    def observed_steps(self) -> list:
        return sorted(self._steps)

    def save(self, path: str) -> None:
        """Save the tracker (rank 0 only; a no-op elsewhere)."""
        if self.is_main:
            self.tracker.save(path)

    def apply_prediction(self, model: nn.Module, prediction, *, backend: str = "auto") -> None:
        """Merge a :class:`pyrank.Prediction` into the live model's weights, in place.

        Every rank must call it. Rank 0's factors are broadcast, so DDP replicas stay
        identical; a sharded (FSDP) model is refused: write the prediction to disk with
        ``pyrank extrapolate`` and restart from it instead.
        """
        from .. import ops

        inner = unwrap_model(model)
        if _is_sharded(inner):
            raise NotImplementedError("apply_prediction on an FSDP/DTensor-sharded model is not supported; "
                                      "use `pyrank extrapolate` on saved checkpoints")
        params = dict(inner.named_parameters())
        # the factors' ranks, so every rank can receive them
        ranks = _from_rank0({n: prediction.factors[n].U.shape[1] for n in self.modules} if self.is_main else None)
        for name in self.modules:
            p = params[name]
            if self.is_main:
                f = prediction.factors[name]
                US = (f.U * f.S).float().to(p.device)
                V, alpha = f.V.float().to(p.device), torch.tensor([f.alpha], dtype=torch.float32, device=p.device)
            else:
                US = torch.empty(p.shape[0], ranks[name], device=p.device)
                V = torch.empty(p.shape[1], ranks[name], device=p.device)
                alpha = torch.empty(1, device=p.device)
            if _multi_process():
                for t in (US, V, alpha):
                    torch.distributed.broadcast(t, src=0)
            w = p.data
            with torch.no_grad():
                ops.merge_lowrank(w, US, torch.ones(US.shape[1], device=p.device), V, float(alpha), out=w,
                                  backend=backend)
