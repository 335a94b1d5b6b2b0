"""Lazy, read-only readers for model directories, weight files and training runs."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch

from .errors import PyrankIOError

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PT_NAMES = ("pytorch_model.bin", "model.pt", "model.bin")
_PT_INDEX = "pytorch_model.bin.index.json"
# safetensors' dtype codes as torch names them, so a .bin checkpoint and a safetensors base compare
_ST_DTYPES = {"BF16": "torch.bfloat16", "F16": "torch.float16", "F32": "torch.float32", "F64": "torch.float64",
              "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
              "U8": "torch.uint8", "BOOL": "torch.bool", "F8_E4M3": "torch.float8_e4m3fn",
              "F8_E5M2": "torch.float8_e5m2"}


class LazyWeights(Mapping):
    """name → tensor, read from safetensors files one tensor per access, read-only.
    ``source`` names what was opened; ``file_of(name)`` the file a tensor is in.

    Each access opens the file, copies the one tensor out and closes it again: a mapping
    kept open would leave every page it ever read counted in the process's RSS, and
    analyzing a series would then look (and, under memory pressure, act) like holding
    every model whole."""

    def __init__(self, files: Dict[str, str], source: str):
        self._files = files  # tensor name -> file path
        self.source = source

    def _read(self, name, fn):
        from safetensors import safe_open

        path = self._files[name]
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:  # truncated or corrupted file
            raise PyrankIOError(f"{path}: cannot read safetensors file ({_short(exc)})") from None
        try:
            return fn(f)
        except Exception as exc:
            raise PyrankIOError(f"{path}: cannot read tensor {name!r} ({_short(exc)})") from None
        finally:
            del f  # unmaps the file

    def __getitem__(self, name):
        if name not in self._files:
            raise KeyError(name)
        return self._read(name, lambda f: f.get_tensor(name).clone())

    def __contains__(self, name):  # from the index: Mapping's default would read the tensor
        return name in self._files

    def file_of(self, name) -> str:
        return self._files[name]

    def shape_dtype(self, name) -> Tuple[Tuple[int, ...], str]:
        """Shape and dtype (torch's name, e.g. ``"torch.bfloat16"``) without reading the data."""
        def meta(f):
            sl = f.get_slice(name)
            code = sl.get_dtype()
            return tuple(sl.get_shape()), _ST_DTYPES.get(code, code)
        return self._read(name, meta)

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)


class OnDevice(Mapping):
    """A view of ``weights`` whose tensors are moved to ``device`` as they are read (one at a
    time, like the mapping it wraps); ``shape_dtype``, ``source`` and ``file_of`` pass through."""

    def __init__(self, weights: Mapping, device):
        self._w, self.device = weights, device

    def __getitem__(self, name):
        return self._w[name].to(self.device)

    def __getattr__(self, attr):  # shape_dtype, source, file_of of the wrapped mapping
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._w, attr)

    def __contains__(self, name):
        return name in self._w

    def __iter__(self):
        return iter(self._w)

    def __len__(self):
        return len(self._w)


class _EagerWeights(dict):
    """A state dict loaded whole (``.pt``/``.bin``: pickle-based formats cannot be read lazily)."""

    source = ""

    def file_of(self, name):
        return self.source


def _short(exc) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def read_json(path: str):
    """A JSON file pyrank wrote (tracker, prediction), read as UTF-8."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _regular_file(path: str, what: str = "weight file") -> str:
    """``path`` if it is a regular file; a FIFO, device or socket would block or stream forever."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise PyrankIOError(f"{path}: cannot open {what} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise PyrankIOError(f"{path}: not a regular file (a {what} must be one; FIFOs and devices are refused)")
    return path


def _safetensors_names(path: str) -> List[str]:
    from safetensors import safe_open

    _regular_file(path)

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as exc:
        raise PyrankIOError(f"{path}: cannot read safetensors file ({_short(exc)})") from None


def _load_pt(path: str) -> _EagerWeights:
    _regular_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise PyrankIOError(
            f"{path}: not loadable with torch.load(weights_only=True) ({_short(exc)}); pyrank "
            "never unpickles arbitrary objects — convert it to safetensors") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PyrankIOError(f"{path}: not a state dict of tensors")
    out = _EagerWeights(sd)
    out.source = path
    return out


def open_weights(path: str) -> Mapping:
    """A read-only mapping name → tensor for a model directory or weight file (see module doc)."""
    if not os.path.exists(path):
        raise PyrankIOError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        _regular_file(path)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return LazyWeights({n: path for n in _safetensors_names(path)}, path)
        if path.endswith((".pt", ".bin", ".pth")):
            return _load_pt(path)
        raise PyrankIOError(f"{path}: unknown weight file type (expected .safetensors, .pt or .bin)")
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        try:
            with open(_regular_file(index, "index"), encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except PyrankIOError:
            raise
        except Exception as exc:
            raise PyrankIOError(f"{index}: not a safetensors index ({_short(exc)})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise PyrankIOError(f"{index}: not a safetensors index (weight_map must map tensor names to file "
                                f"names, got {type(weight_map).__name__})")
        files = {}
        for name, shard in weight_map.items():
            shard_path = os.path.join(path, shard)
            # a shard is a file name in this directory, as HF writes them (a symlink there, as in
            # the Hub cache, is fine): never a path that leaves it
            if os.path.isabs(shard) or os.path.dirname(os.path.normpath(shard)) or shard in ("", ".", ".."):
                raise PyrankIOError(f"{index}: shard {shard!r} of tensor {name!r} is not a file in {path}")
            if not os.path.exists(shard_path):
                raise PyrankIOError(f"{shard_path}: shard named by {index} is missing")
            files[name] = shard_path
        for shard_path in sorted(set(files.values())):  # every shard must open and hold what the index says
            present = set(_safetensors_names(shard_path))
            lost = [n for n, p in files.items() if p == shard_path and n not in present]
            if lost:
                raise PyrankIOError(f"{shard_path}: lacks tensor {lost[0]!r} named by {index}")
        return LazyWeights(files, path)
    single = os.path.join(path, _SINGLE)
    if os.path.exists(single):
        return LazyWeights({n: single for n in _safetensors_names(single)}, path)
    sts = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(sts) == 1:
        p = os.path.join(path, sts[0])
        return LazyWeights({n: p for n in _safetensors_names(p)}, path)
    for name in _PT_NAMES:
        if os.path.exists(os.path.join(path, name)):
            return _load_pt(os.path.join(path, name))
    if os.path.exists(os.path.join(path, _PT_INDEX)):
        raise PyrankIOError(f"{path}: sharded .bin checkpoints are not supported; convert to safetensors")
    raise PyrankIOError(f"{path}: no weights found (expected {_SINGLE}, {_INDEX} with shards, "
                        "or a .pt/.bin state dict)")


_PATTERNS = [  # (regex on the entry name, where the weights are inside it)
    (re.compile(r"^checkpoint-(\d+)$"), ""),
    (re.compile(r"^global_step_(\d+)$"), os.path.join("actor", "huggingface")),
    (re.compile(r"^global_step(\d+)_hf$"), ""),
]


def _trainer_step(d: str) -> Optional[int]:
    p = os.path.join(d, "trainer_state.json")
    if os.path.exists(p):
        try:
            with open(p) as f:
                return int(json.load(f)["global_step"])
        except Exception:
            return None
    return None


_STEP_NAMES = [re.compile(r"checkpoint-(\d+)$"), re.compile(r"global_step_?(\d+)(_hf)?$")]


def step_of(path: str) -> Optional[int]:
    """The training step of a checkpoint directory or file: ``trainer_state.json``'s
    ``global_step`` when present, else its name (``checkpoint-N``, ``global_step_N`` — also
    seen through verl's ``…/actor/huggingface`` — or ``global_stepN_hf``); None if neither says."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-2:] == ["actor", "huggingface"]:  # verl
        parts = parts[:-2]
    d = os.sep.join(parts)
    st = _trainer_step(d) if os.path.isdir(d) else None
    if st is not None:
        return st
    for rx in _STEP_NAMES:
        mt = rx.search(parts[-1])
        if mt:
            return int(mt.group(1))
    return None


def find_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """[(step, weights directory)] of a training run, sorted by step.

    The step comes from ``trainer_state.json``'s ``global_step`` when present, else from
    the folder name (``checkpoint-N``, ``global_step_N``, ``global_stepN_hf``).
    """
    if not os.path.isdir(run_dir):
        raise PyrankIOError(f"{run_dir}: not a directory")
    found: Dict[int, str] = {}
    for entry in sorted(os.listdir(run_dir)):
        for pat, inner in _PATTERNS:
            mt = pat.match(entry)
            if not mt:
                continue
            d = os.path.join(run_dir, entry, inner) if inner else os.path.join(run_dir, entry)
            if not os.path.isdir(d):
                continue
            step = step_of(os.path.join(run_dir, entry))
            if step in found:
                raise PyrankIOError(f"{run_dir}: two checkpoints claim step {step}: {found[step]} and {d}")
            found[step] = d
    if not found:
        raise PyrankIOError(f"{run_dir}: no checkpoints (expected checkpoint-N/, global_step_N/actor/"
                            "huggingface/ or global_stepN_hf/ folders)")
    return sorted(found.items())
