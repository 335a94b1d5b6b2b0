"""DeepSpeed ZeRO checkpoints (``engine.save_checkpoint``), read as one model without running
``zero_to_fp32`` first.

Where they are: OpenRLHF writes ``ckpt/_actor/global_stepN/`` (with ``_actor/latest``); HF
Trainer/TRL/accelerate with DeepSpeed write ``checkpoint-N/global_stepN/`` (with
``checkpoint-N/latest``). A tag directory holds, for data-parallel world size W:

* ZeRO stage 1 and 2: ``mp_rank_00_model_states.pt``, whose ``module`` is the whole model in
  its training dtype (bf16 under ``bf16.enabled``) — what is read; the ``*_optim_states.pt``
  files (Adam moments and fp32 master partitions) are never opened.
* ZeRO stage 3: ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank, whose ``module``
  holds empty placeholders (their dtype is the model's) plus ``param_shapes``, and
  ``*zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank, whose
  ``optimizer_state_dict.fp32_flat_groups`` are the only copy of the weights: the fp32
  master partitions. Parameter p (in ``param_shapes`` order) has c = ⌈numel/W⌉ elements on
  every rank at the same offset of its flat group; the tensor is the ranks' pieces
  concatenated, cut to numel, viewed as its shape — ``zero_to_fp32``'s own reconstruction,
  to which the tests compare bit for bit. Frozen parameters come from each rank's
  ``frozen_param_fragments`` the same way; tied ones from ``shared_params``.

dtype: by default a ZeRO-3 tensor is returned in the model's dtype, rounded (to nearest
even) from the fp32 master, which is exactly the value the engine's bf16 module held
(DeepSpeed copies the master into it after each step) and what a stage 1/2 checkpoint or an
HF copy of the model would hold; ``dtype="float32"`` returns the masters as
``zero_to_fp32`` does (a series must then have a float32 base).

Safety: every file goes through ``torch.load(weights_only=True, mmap=True)`` — nothing is
read until a tensor is asked for, then only its pages. A ZeRO-3 optimizer file also pickles
two DeepSpeed objects, ``ZeroStageEnum`` (an int enum) and a ``LossScaler``/
``DynamicLossScaler`` (scalars); they are admitted under their names as inert stand-ins (the
enum becomes its int, the scaler an inert record of its fields): DeepSpeed itself is never imported and no
other global is allowed. Tensor (``mp_rank_01…``) and pipeline (``layer_*``) parallel
checkpoints are refused with a clear error: not read yet.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch

from .errors import PyrankIOError
from .unpickle import Record, int_value, load_weights_only

LATEST = "latest"
_Z12_MODEL = "mp_rank_00_model_states.pt"
_Z3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_Z3_OPTIM = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_OTHER_MP = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_(?!00_)\d+_model_states\.pt$")
_PIPELINE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")


def is_deepspeed(path: str) -> bool:
    """Whether ``path`` is a DeepSpeed tag directory (one checkpoint's model-state files)."""
    if not os.path.isdir(path):
        return False
    return any(f == _Z12_MODEL or _Z3_MODEL.match(f) or _OTHER_MP.match(f) or _PIPELINE.match(f)
               for f in os.listdir(path))


def deepspeed_tag_dir(path: str) -> Optional[str]:
    """The DeepSpeed tag directory ``path`` is or holds: itself, the one its ``latest`` file
    names, or its only ``global_step*`` subdirectory that is one; None if none."""
    if is_deepspeed(path):
        return path
    if not os.path.isdir(path):
        return None
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        try:
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
        except (OSError, UnicodeDecodeError):
            tag = ""
        if tag and os.sep not in tag and tag not in (".", "..") and is_deepspeed(os.path.join(path, tag)):
            return os.path.join(path, tag)
    tags = [d for d in sorted(os.listdir(path)) if d.startswith("global_step") and is_deepspeed(os.path.join(path, d))]
    return os.path.join(path, tags[0]) if len(tags) == 1 else None


_STAND_INS = [(int_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
              (Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
              (Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")]


def _load(p: str, what: str, stand_ins: bool = False):
    from .readers import _regular_file

    return load_weights_only(_regular_file(p, what), f"a truncated file, or not a DeepSpeed {what}",
                             _STAND_INS if stand_ins else ())


def _get(d, key, p, kind=None):
    if not isinstance(d, dict) or key not in d or (kind is not None and not isinstance(d[key], kind)):
        raise PyrankIOError(f"{p}: not a DeepSpeed checkpoint file (no {key!r}"
                            + (f" of type {kind.__name__}" if kind is not None else "") + ")")
    return d[key]


class DeepSpeedWeights(Mapping):
    """name → tensor of a DeepSpeed ZeRO checkpoint: a tag directory, or a folder whose
    ``latest`` names one (see the module doc).

    ``dtype``: None (the model's dtype, default) or ``"float32"`` (ZeRO-3's fp32 masters,
    as ``zero_to_fp32``; stage 1/2 keep no whole fp32 copy outside the optimizer partitions,
    which are not read)."""

    def __init__(self, path: str, dtype: Optional[str] = None):
        if dtype not in (None, "float32"):
            raise ValueError(f"dtype must be None (the model's) or 'float32', got {dtype!r}")
        tag = deepspeed_tag_dir(path)
        if tag is None:
            raise PyrankIOError(f"{path}: not a DeepSpeed checkpoint (no *model_states.pt files, nor a latest "
                                "file or one global_step* folder holding them)")
        self.path = self.source = path = tag
        files = os.listdir(path)
        other = sorted(f for f in files if _OTHER_MP.match(f) or _PIPELINE.match(f))
        if other:
            raise PyrankIOError(f"{os.path.join(path, other[0])}: a tensor- or pipeline-parallel DeepSpeed "
                                "checkpoint; not read yet (only data-parallel ZeRO: mp_rank_00 files)")
        self._files: List[str] = []
        self._whole: Dict[str, torch.Tensor] = {}  # name → tensor held whole (stage 1/2, buffers, frozen)
        self._parts: Dict[str, Tuple[int, int, Tuple[int, ...]]] = {}  # ZeRO-3: name → (offset, c, shape)
        self._alias: Dict[str, str] = {}
        if _Z12_MODEL in files:
            self._open_z12(os.path.join(path, _Z12_MODEL), dtype)
        else:
            self._open_z3(path, files, dtype)
        self._names = list(dict.fromkeys([*self._whole, *self._parts, *self._alias]))

    # -- stage 1/2 -----------------------------------------------------------------------
    def _open_z12(self, p, dtype):
        sd = _load(p, "model-states file")
        module = _get(sd, "module", p, dict)
        if not all(isinstance(v, torch.Tensor) for v in module.values()):
            raise PyrankIOError(f"{p}: its 'module' is not a state dict of tensors")
        if dtype is not None:
            raise PyrankIOError(f"{self.path}: a ZeRO stage 1/2 checkpoint keeps the model whole only in its "
                                "training dtype; its fp32 masters are optimizer partitions, not read here")
        self._whole = dict(module)
        self._files = [p]
        self._dtype = None
        self.layout = f"DeepSpeed ZeRO stage {self._stage(sd, 2)} model states"

    @staticmethod
    def _stage(sd, default):
        try:
            return int(sd["ds_config"]["zero_optimization"]["stage"])
        except Exception:
            return default

    # -- stage 3 -------------------------------------------------------------------------
    def _open_z3(self, path, files, dtype):
        model_files, optim_files = {}, {}
        for f in files:
            for rx, into in ((_Z3_MODEL, model_files), (_Z3_OPTIM, optim_files)):
                mt = rx.match(f)
                if mt:
                    into[int(mt.group(1))] = os.path.join(path, f)
        if not model_files:
            raise PyrankIOError(f"{path}: no DeepSpeed model-states files")
        first = model_files[min(model_files)]
        head = _load(first, "model-states file")
        world = _get(head, "dp_world_size", first, int)
        for r in range(world):
            for have, what in ((model_files, "model_states"), (optim_files, "optim_states")):
                if r not in have:
                    raise PyrankIOError(f"{os.path.join(path, f'zero_pp_rank_{r}_mp_rank_00_{what}.pt')}: missing "
                                        f"({first} says data-parallel world size {world}: a half-written checkpoint?)")
        extra = sorted((set(model_files) | set(optim_files)) - set(range(world)))
        if extra:
            raise PyrankIOError(f"{path}: rank {extra[0]}'s files, but {first} says world size {world} "
                                "(files of two runs mixed?)")
        models = [head] + [_load(model_files[r], "model-states file") for r in range(1, world)]
        flats = []
        for r in range(world):
            p = optim_files[r]
            osd = _get(_load(p, "optimizer-states file (ZeRO-3 keeps its weights there)", stand_ins=True),
                       "optimizer_state_dict", p, dict)
            if osd.get("zero_stage") != 3:
                raise PyrankIOError(f"{p}: zero_stage {osd.get('zero_stage')!r}, but per-rank model-state files "
                                    "are ZeRO-3's")
            if osd.get("partition_count") != world:
                raise PyrankIOError(f"{p}: partition count {osd.get('partition_count')!r}, but {first} says world "
                                    f"size {world} (files of two runs mixed?)")
            groups = _get(osd, "fp32_flat_groups", p, list)
            if not groups or not all(isinstance(g, torch.Tensor) and g.dim() == 1 for g in groups):
                raise PyrankIOError(f"{p}: fp32_flat_groups is not a list of flat tensors")
            flats.append([g.detach() for g in groups])
        sizes = [g.numel() for g in flats[0]]
        for r in range(1, world):
            if [g.numel() for g in flats[r]] != sizes:
                raise PyrankIOError(f"{optim_files[r]}: its flat groups' sizes differ from rank 0's")
        self._flats, self._bounds = flats, [0, *torch.tensor(sizes).cumsum(0).tolist()]
        module = _get(head, "module", first, dict)
        shapes = _get(head, "param_shapes", first, list)
        self._dtype = torch.float32 if dtype == "float32" else None
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                c = math.ceil(math.prod(shape) / world)
                self._parts[name] = (offset, c, tuple(shape))
                offset += c
        if offset != self._bounds[-1]:
            raise PyrankIOError(f"{path}: param_shapes need {offset} elements per rank, the flat groups hold "
                                f"{self._bounds[-1]} (files of two runs mixed?)")
        self._model_dtype = {n: module[n].dtype if isinstance(module.get(n), torch.Tensor) else torch.float32
                             for n in self._parts}
        for n in head.get("buffer_names") or ():
            if isinstance(module.get(n), torch.Tensor):
                self._whole[n] = module[n]
        frozen = head.get("frozen_param_shapes") or {}
        for n, shape in frozen.items():
            frags = [m.get("frozen_param_fragments", {}).get(n) for m in models]
            if not all(isinstance(t, torch.Tensor) for t in frags):
                raise PyrankIOError(f"{path}: frozen parameter {n!r} lacks a rank's fragment")
            self._whole[n] = torch.cat([t.reshape(-1) for t in frags])[:math.prod(shape)].view(tuple(shape))
        for n, src in (head.get("shared_params") or {}).items():
            self._alias[n] = src
        self._files = [model_files[r] for r in range(world)] + [optim_files[r] for r in range(world)]
        self.layout = f"DeepSpeed ZeRO stage 3 partitions (world size {world})"

    def _rank_piece(self, r, offset, c):
        lo, hi, out = offset, offset + c, []
        for g, (a, b) in enumerate(zip(self._bounds, self._bounds[1:])):
            if a < hi and lo < b:
                out.append(self._flats[r][g][max(lo, a) - a:min(hi, b) - a])
        return out

    def _out_dtype(self, name):
        return self._dtype or self._model_dtype[name]

    # -- the mapping ---------------------------------------------------------------------
    def _resolve(self, name):
        return self._alias.get(name, name)

    def __getitem__(self, name):
        n = self._resolve(name)
        if n in self._whole:
            t = self._whole[n]
            return t.to(self._dtype) if self._dtype is not None and t.is_floating_point() else t.clone()
        if n not in self._parts:
            raise KeyError(name)
        offset, c, shape = self._parts[n]
        pieces = [p for r in range(len(self._flats)) for p in self._rank_piece(r, offset, c)]
        flat = torch.cat(pieces)[:math.prod(shape)]
        return flat.view(shape).to(self._out_dtype(n))

    def shape_dtype(self, name):
        n = self._resolve(name)
        if n in self._whole:
            t = self._whole[n]
            dt = self._dtype if self._dtype is not None and t.is_floating_point() else t.dtype
            return tuple(t.shape), str(dt)
        if n not in self._parts:
            raise KeyError(name)
        return self._parts[n][2], str(self._out_dtype(n))

    def file_of(self, name) -> str:
        return self._files[0]

    def __contains__(self, name):
        return self._resolve(name) in self._whole or self._resolve(name) in self._parts

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)
