"""verl's FSDP checkpoints: ``global_step_N/actor/model_world_size_W_rank_R.pt``, read as one
model without merging them first.

verl's FSDPCheckpointManager saves every rank's ``model.state_dict()`` under FSDP's sharded
state dict with ``torch.save``, beside ``fsdp_config.json`` (``FSDP_version``, ``world_size``);
optimizer and extra-state files sit next to them and are never opened here. Names are the
HF model's.

* FSDP2 (``fully_shard``): values are DTensors on a 1-D mesh, ``Shard(0)`` (torch.chunk
  rows: rank r holds rows [r·c, (r+1)·c), c = ⌈m/W⌉) or ``Replicate()``. A tensor is its
  ranks' local row blocks concatenated in rank order. Each rank file is loaded with
  ``torch.load(weights_only=True, mmap=True)``: the allowlist is torch's own (it admits
  DTensor, its spec, placements and DeviceMesh once ``torch.distributed.tensor`` is imported,
  nothing else); with ``mmap`` nothing is read until a tensor is asked for, and then only its
  shards' pages.
* FSDP1 (``ShardedTensor``): unpickling one needs a process group; not read yet — the error
  says so and how to convert.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

import torch

from .errors import PyrankIOError, short

FSDP_CONFIG = "fsdp_config.json"
_RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def is_verl_fsdp(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, FSDP_CONFIG)) and any(
        _RANK_FILE.match(f) for f in os.listdir(path))


class FSDPShardedWeights(Mapping):
    """name → tensor of a verl FSDP actor directory (see the module doc)."""

    def __init__(self, path: str):
        from .readers import _regular_file

        self.path = self.source = path
        cfg_path = _regular_file(os.path.join(path, FSDP_CONFIG), "FSDP config")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            version, world = int(cfg["FSDP_version"]), int(cfg["world_size"])
        except Exception as exc:
            raise PyrankIOError(f"{cfg_path}: not verl's fsdp_config.json ({short(exc)})") from None
        found = {}
        for f in os.listdir(path):
            mt = _RANK_FILE.match(f)
            if mt:
                found.setdefault(int(mt.group(1)), set()).add(int(mt.group(2)))
        if set(found) - {world}:
            other = sorted(set(found) - {world})[0]
            raise PyrankIOError(f"{path}: rank files of world size {other}, but {cfg_path} says {world} "
                                "(files of two runs mixed?)")
        lost = [r for r in range(world) if r not in found.get(world, set())]
        if lost:
            raise PyrankIOError(f"{os.path.join(path, f'model_world_size_{world}_rank_{lost[0]}.pt')}: missing "
                                f"({cfg_path} says world size {world}: a half-written checkpoint?)")
        if version != 2:
            raise PyrankIOError(f"{path}: FSDP{version} sharded checkpoints (ShardedTensor) are not read yet; "
                                "convert it with verl's model_merger, or save with FSDP2 (fully_shard)")
        self._files = [_regular_file(os.path.join(path, f"model_world_size_{world}_rank_{r}.pt"), "rank file")
                       for r in range(world)]
        self._parts = [self._load(p) for p in self._files]
        names = list(self._parts[0])
        for p, sd in zip(self._files[1:], self._parts[1:]):
            if list(sd) != names:
                raise PyrankIOError(f"{p}: holds other tensors than {self._files[0]}")
        self._names = names
        self.layout = f"verl FSDP2 rank files (world size {world})"

    @staticmethod
    def _load(p):
        import torch.distributed.tensor  # noqa: F401  (registers DTensor with weights_only loading)

        log = logging.getLogger("torch.distributed.device_mesh")
        level = log.level
        log.setLevel(logging.ERROR)  # unpickling a mesh without process groups warns, harmlessly here
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise PyrankIOError(f"{p}: not loadable with torch.load(weights_only=True) ({short(exc)}); a "
                                "truncated file, or not an FSDP2 rank file") from None
        finally:
            log.setLevel(level)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise PyrankIOError(f"{p}: not a state dict of tensors")
        return sd

    def _pieces(self, name):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        vals = [sd[name] for sd in self._parts]
        v0 = vals[0]
        if not isinstance(v0, DTensor):
            return [v0], "whole"
        if len(v0.placements) != 1:
            raise PyrankIOError(f"{self._files[0]}: tensor {name!r} is placed {v0.placements} on a "
                                f"{len(v0.placements)}-D mesh; only 1-D meshes (FSDP2 without HSDP) are read")
        pl = v0.placements[0]
        if isinstance(pl, Replicate):
            return [v0.to_local()], "whole"
        if isinstance(pl, Shard) and pl.dim == 0:
            return [v.to_local() for v in vals], "rows"
        raise PyrankIOError(f"{self._files[0]}: tensor {name!r} is placed {pl}; only Shard(0) and Replicate are read")

    def shape_dtype(self, name):
        v = self._parts[0][name]
        return tuple(v.shape), str(v.dtype)

    def nbytes(self, name) -> int:
        v = self._parts[0][name]
        return v.numel() * v.element_size()

    def file_of(self, name) -> str:
        return self._files[0]

    def __getitem__(self, name):
        if name not in self._parts[0]:
            raise KeyError(name)
        pieces, how = self._pieces(name)
        full = tuple(self._parts[0][name].shape)
        out = torch.cat(pieces, 0) if how == "rows" else pieces[0].clone()
        if tuple(out.shape) != full:
            raise PyrankIOError(f"{self.path}: the rank files' shards of {name!r} make {list(out.shape)}, "
                                f"not its {list(full)}")
        return out

    def __contains__(self, name):
        return name in self._parts[0]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)
