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
* FSDP1 (``SHARDED_STATE_DICT``): values are ``ShardedTensor``s, row chunks of each tensor
  with their offsets. torch's own unpickling of one needs an initialized process group of
  the saving rank's rank and world size (``ShardedTensor.__setstate__`` checks them), and
  ``weights_only`` refuses the class. pyrank loads these files with a restricted unpickler
  instead (``_ShardedTensorUnpickler``): the ShardedTensor, its ``Shard``s and their
  metadata (``ShardMetadata``, ``ShardedTensorMetadata``, ``TensorProperties``,
  ``ChunkShardingSpec``, ``_remote_device``, ``ProcessGroupState``) become inert records of
  their pickled fields — no process group, no torch.distributed code runs — and only torch's
  tensor rebuilders, storages, dtypes, devices, layouts, ``torch.Size`` and ``OrderedDict``
  resolve to the real thing; any other global is refused by name. A tensor is the ranks'
  local shards copied in at their offsets, with the global metadata checked to cover it.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import types
from collections.abc import Mapping

import torch

from .errors import PyrankIOError, short
from .unpickle import Record, TensorPropertiesRecord, int_value, load_weights_only

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
        if version not in (1, 2):
            raise PyrankIOError(f"{cfg_path}: FSDP_version {version}; pyrank reads verl's FSDP1 and FSDP2 rank files")
        self._version = version
        self._files = [_regular_file(os.path.join(path, f"model_world_size_{world}_rank_{r}.pt"), "rank file")
                       for r in range(world)]
        self._parts = [self._load(p) if version == 2 else _load_fsdp1(p) for p in self._files]
        names = list(self._parts[0])
        for p, sd in zip(self._files[1:], self._parts[1:]):
            if list(sd) != names:
                raise PyrankIOError(f"{p}: holds other tensors than {self._files[0]}")
        self._names = names
        self.layout = f"verl FSDP{version} rank files (world size {world})"

    @staticmethod
    def _load(p):
        import torch.distributed.tensor  # noqa: F401  (registers DTensor with weights_only loading)

        log = logging.getLogger("torch.distributed.device_mesh")
        level = log.level
        log.setLevel(logging.ERROR)  # unpickling a mesh without process groups warns, harmlessly here
        try:
            sd = load_weights_only(p, "a truncated file, or not an FSDP2 rank file")
        finally:
            log.setLevel(level)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise PyrankIOError(f"{p}: not a state dict of tensors")
        return sd

    def _pieces(self, name):
        vals = [sd[name] for sd in self._parts]
        v0 = vals[0]
        if isinstance(v0, _ShardedRecord):
            return vals, "sharded"
        from torch.distributed.tensor import DTensor, Replicate, Shard

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

    def file_of(self, name) -> str:
        return self._files[0]

    def __getitem__(self, name):
        if name not in self._parts[0]:
            raise KeyError(name)
        pieces, how = self._pieces(name)
        full = tuple(self._parts[0][name].shape)
        if how == "sharded":
            return _assemble(name, pieces, self._files)
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


# -- FSDP1: ShardedTensor without a process group -------------------------------------------

class _ShardedTensorClass:
    """What the name ``ShardedTensor`` resolves to: a marker; only ``ProcessGroupState`` is an
    attribute of it."""

    ProcessGroupState = Record


class _ShardedRecord:
    """A ShardedTensor as pickled: its rank's local shards and the global metadata."""

    def __init__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 2 and isinstance(state[0], list)
                and isinstance(state[1], Record)):
            raise pickle.UnpicklingError("a ShardedTensor whose state is not (local shards, metadata, …)")
        self.local_shards, self.metadata = state[0], state[1]
        size = getattr(self.metadata, "size", None)
        props = getattr(self.metadata, "tensor_properties", None)
        dtype = getattr(props, "dtype", None)
        if not isinstance(size, torch.Size) or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("a ShardedTensor without its global size and dtype")
        self.shape, self.dtype = size, dtype


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch's version calls func(*args) to make the tensor subclass; here only ShardedTensor
    # is admitted, and it becomes a record of its pickled state — func is never called
    if new_type is not _ShardedTensorClass:
        raise pickle.UnpicklingError(f"tensor subclass {new_type!r} is not allowed in an FSDP1 rank file")
    return _ShardedRecord(state)


def _never_called(*args):
    raise pickle.UnpicklingError("_rebuild_wrapper_subclass is not called by pyrank's reader")


def _restricted_getattr(obj, name):
    if obj is _ShardedTensorClass and name == "ProcessGroupState":
        return Record
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed in an FSDP1 rank file")


_FSDP1_GLOBALS = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_wrapper_subclass"): _never_called,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
    ("builtins", "getattr"): _restricted_getattr,
    ("__builtin__", "getattr"): _restricted_getattr,
    ("torch.distributed._shard.sharded_tensor.api", "ShardedTensor"): _ShardedTensorClass,
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): int_value,
    **{key: Record for key in (
        ("torch.distributed._shard.sharded_tensor.shard", "Shard"),
        ("torch.distributed._shard.metadata", "ShardMetadata"),
        ("torch.distributed.remote_device", "_remote_device"),
        ("torch.distributed._shard.sharded_tensor.metadata", "ShardedTensorMetadata"),
        ("torch.distributed._shard.sharding_spec.chunk_sharding_spec", "ChunkShardingSpec"))},
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"): TensorPropertiesRecord,
}
_TORCH_DTYPE_NAMES = {"bfloat16", "float16", "float32", "float64", "half", "float", "double", "int64", "int32",
                      "int16", "int8", "uint8", "bool"}


class _ShardedTensorUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return getattr(torch, name)
        if (module, name) in _FSDP1_GLOBALS:
            return _FSDP1_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an FSDP1 rank file")


def _restricted_load(file, **kwargs):
    return _ShardedTensorUnpickler(file, **kwargs).load()


# torch.load's pickle_module: torch subclasses its Unpickler (storages are resolved by torch
# itself, by type name; every other global goes through find_class above)
_FSDP1_PICKLE = types.SimpleNamespace(__name__="pyrank_fsdp1_pickle", Unpickler=_ShardedTensorUnpickler,
                                      load=_restricted_load)


def _load_fsdp1(p):
    try:
        sd = torch.load(p, map_location="cpu", weights_only=False, pickle_module=_FSDP1_PICKLE, mmap=True)
    except Exception as exc:
        raise PyrankIOError(f"{p}: not loadable as an FSDP1 rank file ({short(exc)}); a truncated file, or "
                            "not one") from None
    if not isinstance(sd, dict) or not all(isinstance(v, (torch.Tensor, _ShardedRecord)) for v in sd.values()):
        raise PyrankIOError(f"{p}: not a state dict of tensors")
    return sd


def _assemble(name, records, files):
    """The whole tensor from every rank's local shards, each copied in at its offsets; the
    global metadata (the same in every file) must list exactly the shards found."""
    first = records[0]
    out = torch.empty(first.shape, dtype=first.dtype)
    want = {}
    for sm in getattr(first.metadata, "shards_metadata", []):
        want[tuple(sm.shard_offsets)] = tuple(sm.shard_sizes)
    got = 0
    for f, rec in zip(files, records):
        if tuple(rec.shape) != tuple(first.shape) or rec.dtype != first.dtype:
            raise PyrankIOError(f"{f}: tensor {name!r} is {list(rec.shape)} {rec.dtype} there, "
                                f"{list(first.shape)} {first.dtype} in {files[0]}")
        for sh in rec.local_shards:
            t, meta = getattr(sh, "tensor", None), getattr(sh, "metadata", None)
            offs, sizes = tuple(getattr(meta, "shard_offsets", ())), tuple(getattr(meta, "shard_sizes", ()))
            if not isinstance(t, torch.Tensor) or want.get(offs) != sizes or tuple(t.shape) != sizes:
                raise PyrankIOError(f"{f}: a shard of {name!r} at {list(offs)} does not match the global metadata")
            out[tuple(slice(o, o + n) for o, n in zip(offs, sizes))] = t
            got += 1
    if got != len(want):
        raise PyrankIOError(f"{files[0]}: the rank files hold {got} of the {len(want)} shards of {name!r}")
    return out
