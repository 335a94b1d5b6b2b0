"""Lazy, read-only readers for model directories, weight files and training runs."""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch

from .errors import PyrankIOError, short

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PT_NAMES = ("pytorch_model.bin", "model.pt", "model.bin")
_PT_INDEX = "pytorch_model.bin.index.json"
# safetensors' dtype codes as torch names them, so a .bin checkpoint and a safetensors base compare
_ST_DTYPES = {"BF16": "torch.bfloat16", "F16": "torch.float16", "F32": "torch.float32", "F64": "torch.float64",
              "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
              "U8": "torch.uint8", "U16": "torch.uint16", "U32": "torch.uint32", "U64": "torch.uint64",
              "BOOL": "torch.bool", "F8_E4M3": "torch.float8_e4m3fn",
              "F8_E5M2": "torch.float8_e5m2"}


_TORCH_DTYPES = {code: getattr(torch, name.split(".")[1]) for code, name in _ST_DTYPES.items()}
_ITEMSIZE = {code: torch.empty(0, dtype=dt).element_size() for code, dt in _TORCH_DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

# How many holders a storage has (torch's own counter; absent from some builds: no pooling there)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _holders(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


class BufferPool:
    """Read buffers used again once nothing holds a tensor read into them.

    Why: a fresh ``torch.empty`` larger than glibc's mmap threshold (at most 32 MB) is new
    pages from the OS, each faulted in and zeroed by the kernel before the read copies into
    it. Measured on a 2-core VM, page cache warm (benchmarks/bench_io.py): a 7B model's
    18944×3584 MLP weight (130 MiB) read at 1.9 GB/s into fresh buffers and 4.0 GB/s into
    reused ones; at 22 MiB glibc reuses its own heap and the pool changes nothing.

    A buffer is free again when its storage has no holder but the pool (torch's storage use
    count): a tensor read into it, any view of it, or anything still computing on it keeps
    it busy, so a buffer is never overwritten under a live tensor. At most ``keep`` buffers
    are kept (the oldest free one is let go first); a series loop holds a handful of tensors
    at once (base, current, READ_AHEAD), so that bounds its memory the same way."""

    def __init__(self, keep: int = 8):
        import threading

        self.keep = keep
        self._bufs: List[Tuple[torch.Tensor, int]] = []  # (buffer, holders when only the pool has it)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined), in a free buffer if one fits."""
        if _storage_use_count is None or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            free = [i for i, (b, idle) in enumerate(self._bufs) if _holders(b) == idle]
            fits = [i for i in free if self._bufs[i][0].numel() >= nbytes]
            if fits:  # the smallest that fits: large buffers stay free for large tensors
                return self._bufs[min(fits, key=lambda i: self._bufs[i][0].numel())][0][:nbytes]
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._bufs.append((buf, _holders(buf)))
            if len(self._bufs) > self.keep:
                # let go of the oldest free buffer (else the oldest: its holder frees it)
                self._bufs.pop(free[0] if free else 0)
            return buf


class _Entry:
    """Where one tensor's bytes are in its file."""
    __slots__ = ("code", "shape", "start", "nbytes")

    def __init__(self, code, shape, start, nbytes):
        self.code, self.shape, self.start, self.nbytes = code, shape, start, nbytes


def _header(path: str) -> Dict[str, _Entry]:
    """The tensors of a safetensors file, from its header alone (8-byte length, JSON),
    checked: every tensor's byte range lies inside the file and matches its shape and dtype.
    A truncated or corrupted file is refused here, naming it, before any weight is read."""
    _regular_file(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            hlen = int.from_bytes(raw, "little")
            if hlen > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {hlen} exceeds the file")
            meta = json.loads(f.read(hlen).decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
        data_start = 8 + hlen
        out = {}
        for name, e in meta.items():
            if name == "__metadata__":
                continue
            code, shape, (b, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
            # (a dtype torch lacks is listed, and refused only if it is read)
            nbytes = math.prod(shape) * _ITEMSIZE[code] if code in _ITEMSIZE else end - b
            if not (0 <= b <= end and end - b == nbytes and data_start + end <= size):
                raise ValueError(f"tensor {name!r}: data_offsets {[b, end]} do not fit its shape {shape} "
                                 f"{code} within the file (truncated?)")
            out[name] = _Entry(code, tuple(shape), data_start + b, nbytes)
        return out
    except PyrankIOError:
        raise
    except Exception as exc:  # truncated, corrupted, not safetensors at all
        raise PyrankIOError(f"{path}: cannot read safetensors file ({short(exc)})") from None


PREFETCH_CHUNK = 128 << 10  # bytes per WILLNEED request (see LazyWeights.prefetch)

# A tensor of at least 2 × READ_SPLIT bytes is copied out of the page cache on the kernels'
# threads, one contiguous range each (pyrank._C.read_file): one thread copies at ~5 GB/s. On
# the 1.5B series of benchmarks/bench_series.py (2 cores, Intel Xeon), the series loop's
# copies took 2.5–3.4 s instead of 4.1–5.1 s warm, and a cold 6-layer slice 4.9–5.8 s
# instead of 5.7–7.1 s (interleaved runs). Copy threads of a Python pool did not help there:
# the kernels' OpenMP team still spins on the cores right after a pass.
READ_SPLIT = 8 << 20


def _parallel_read():
    """pyrank._C.read_file, or None where the extension is not built (or has no pread)."""
    try:
        from .._C import read_file
    except ImportError:
        return None
    return read_file


def _kernel_threads() -> int:
    from ..backends import kernel_threads

    return kernel_threads()


class LazyWeights(Mapping):
    """name → tensor, read from safetensors files one tensor per access, read-only.
    ``source`` names what was opened; ``file_of(name)`` the file a tensor is in.

    Each access reads the one tensor's bytes straight into a new tensor (a single copy out
    of the page cache; the file is opened read-only and closed again). Nothing stays
    mapped: a mapping kept open would leave every page it ever read counted in the
    process's RSS, and analyzing a series would then look (and, under memory pressure,
    act) like holding every model whole. Headers are parsed once, when opened."""

    layout = "safetensors"

    def __init__(self, files: Dict[str, str], source: str, headers: Optional[Dict[str, Dict[str, _Entry]]] = None):
        self._files = files  # tensor name -> file path
        self._headers = dict(headers or {})  # file path -> its entries
        self.source = source

    def _entry(self, name) -> _Entry:
        path = self._files[name]
        if path not in self._headers:
            self._headers[path] = _header(path)
        try:
            return self._headers[path][name]
        except KeyError:
            raise PyrankIOError(f"{path}: lacks tensor {name!r}") from None

    def _bytes(self, name, offset: int, nbytes: int, pool: Optional[BufferPool] = None) -> torch.Tensor:
        path = self._files[name]
        buf = torch.empty(nbytes, dtype=torch.uint8) if pool is None else pool.take(nbytes)
        parts = min(_kernel_threads(), nbytes // READ_SPLIT)
        fast = _parallel_read() if parts > 1 else None
        try:
            if fast is not None:
                # (the path as the OS spells it: a name that is not valid UTF-8 reads as well)
                status, detail = fast(os.fsencode(path), offset, nbytes, buf.data_ptr(), parts)
                if status == 2:
                    raise OSError(detail, os.strerror(detail))
                missing = detail if status == 1 else 0
            else:
                view = memoryview(buf.numpy()) if nbytes else None
                with open(path, "rb", buffering=0) as f:  # read-only; readinto releases the GIL
                    got = 0
                    while got < nbytes:
                        f.seek(offset + got)
                        r = f.readinto(view[got:])
                        if not r:
                            break
                        got += r
                missing = nbytes - got
            if missing:
                raise EOFError(f"file ends {missing} bytes early (truncated after it was opened?)")
        except OSError as exc:
            raise PyrankIOError(f"{path}: cannot read tensor {name!r} ({exc.strerror or exc})") from None
        except EOFError as exc:
            raise PyrankIOError(f"{path}: cannot read tensor {name!r} ({exc})") from None
        return buf

    def _dtype(self, name, e):
        if e.code not in _TORCH_DTYPES:
            raise PyrankIOError(f"{self._files[name]}: tensor {name!r} has dtype {e.code}, which torch cannot hold")
        return _TORCH_DTYPES[e.code]

    def __getitem__(self, name):
        return self.read(name)

    def read(self, name, pool: Optional[BufferPool] = None) -> torch.Tensor:
        """``self[name]``, read into a buffer of ``pool`` if given (see :class:`BufferPool`)."""
        if name not in self._files:
            raise KeyError(name)
        e = self._entry(name)
        return self._bytes(name, e.start, e.nbytes, pool).view(self._dtype(name, e)).reshape(e.shape)

    def prefetch(self, name) -> None:
        """Ask the OS to start reading ``name``'s bytes into the page cache, without waiting
        for them or copying them (posix_fadvise WILLNEED; a no-op where there is no such call).
        Asked in PREFETCH_CHUNK pieces: Linux reads at most one readahead window (128 KiB by
        default) per request, so one request for the whole tensor would fetch only its start."""
        if name not in self._files or not hasattr(os, "posix_fadvise"):
            return
        e = self._entry(name)
        try:
            fd = os.open(self._files[name], os.O_RDONLY)
            try:
                for off in range(e.start, e.start + e.nbytes, PREFETCH_CHUNK):
                    os.posix_fadvise(fd, off, min(PREFETCH_CHUNK, e.start + e.nbytes - off),
                                     os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass  # only a hint: the read itself reports what is wrong with the file

    def rows(self, name, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor of ≥ 1 dimension, reading only their bytes."""
        e = self._entry(name)
        dtype = self._dtype(name, e)
        shape = e.shape if e.shape else (1,)
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(start, stop)
        row = math.prod(shape[1:]) * _ITEMSIZE[e.code]
        t = self._bytes(name, e.start + start * row, (stop - start) * row)
        return t.view(dtype).reshape((stop - start,) + tuple(shape[1:]))

    def __contains__(self, name):  # from the index: Mapping's default would read the tensor
        return name in self._files

    def file_of(self, name) -> str:
        return self._files[name]

    def shape_dtype(self, name) -> Tuple[Tuple[int, ...], str]:
        """Shape and dtype (torch's name, e.g. ``"torch.bfloat16"``) without reading the data."""
        e = self._entry(name)
        return e.shape, _ST_DTYPES.get(e.code, e.code)

    def nbytes(self, name) -> int:
        return self._entry(name).nbytes

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
        return self.read(name)

    def read(self, name, pool: Optional[BufferPool] = None) -> torch.Tensor:
        return read_tensor(self._w, name, pool).to(self.device)

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


def read_tensor(weights: Mapping, name: str, pool: Optional[BufferPool] = None) -> torch.Tensor:
    """``weights[name]``, into a buffer of ``pool`` where the reader reads into buffers
    (safetensors, and those moved to a device); other formats build their own tensors."""
    read = getattr(type(weights), "read", None)
    return weights[name] if read is None else read(weights, name, pool)


class _EagerWeights(dict):
    """A state dict loaded whole (``.pt``/``.bin``: pickle-based formats cannot be read lazily)."""

    source = ""
    layout = "torch.save state dict (loaded whole)"

    def file_of(self, name):
        return self.source


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


def _load_pt(path: str) -> _EagerWeights:
    _regular_file(path)
    from .unpickle import load_weights_only

    sd = load_weights_only(path, "pyrank never unpickles arbitrary objects — convert it to safetensors")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    elif isinstance(sd, dict) and len(sd) == 1 and isinstance(next(iter(sd.values())), dict) \
            and next(iter(sd)) in ("model", "module"):  # e.g. dcp_to_torch_save of accelerate's {"model": …}
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PyrankIOError(f"{path}: not a state dict of tensors")
    out = _EagerWeights(sd)
    out.source = path
    return out


def _one_file(path: str, source: str) -> LazyWeights:
    h = _header(path)
    return LazyWeights({n: path for n in h}, source, {path: h})


def open_weights(path: str) -> Mapping:
    """A read-only mapping name → tensor for a model directory or weight file (see module doc)."""
    if not os.path.exists(path):
        raise PyrankIOError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        _regular_file(path)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return _one_file(path, path)
        if path.endswith((".pt", ".bin", ".pth")):
            return _load_pt(path)
        raise PyrankIOError(f"{path}: unknown weight file type (expected .safetensors, .pt or .bin)")
    opener = _layout(path)
    if opener is None:
        raise PyrankIOError(f"{path}: no weights found (expected {_SINGLE}, {_INDEX} with shards, a .pt/.bin "
                            "state dict, a torch Distributed Checkpoint: .metadata with .distcp files, or "
                            "pytorch_model_fsdp_0/ as HF Trainer's FSDP runs write it, verl's FSDP rank files "
                            "model_world_size_W_rank_R.pt with fsdp_config.json, a DeepSpeed ZeRO checkpoint: "
                            "*model_states.pt, or a latest file naming one, or a Megatron torch_dist checkpoint: "
                            "metadata.json with .metadata)")
    return opener()


def _layout(d: str):
    """How directory ``d`` holds model weights: a function that opens them, or None if it
    holds none in a layout pyrank reads. The one place that knows the layouts, in the order
    they are preferred (open_weights and find_checkpoints both ask it)."""
    from .deepspeed import DeepSpeedWeights, deepspeed_tag_dir
    from .fsdp import FSDPShardedWeights, is_verl_fsdp

    names = set(os.listdir(d))
    if _INDEX in names:
        return lambda: _open_index(d)
    if _SINGLE in names:
        return lambda: _one_file(os.path.join(d, _SINGLE), d)
    sts = sorted(f for f in names if f.endswith(".safetensors"))
    if len(sts) == 1:
        return lambda: _one_file(os.path.join(d, sts[0]), d)
    for name in _PT_NAMES:
        if name in names:
            return lambda: _load_pt(os.path.join(d, name))
    if _PT_INDEX in names:
        def refuse():
            raise PyrankIOError(f"{d}: sharded .bin checkpoints are not supported; convert to safetensors")
        return refuse
    from .dcp import is_dcp
    from .megatron import MegatronWeights, megatron_dir

    for sub in (d, os.path.join(d, "actor")):  # verl's megatron backend: global_step_N/actor/dist_ckpt/
        mg = megatron_dir(sub)
        if mg is not None:  # (a DCP too: the Megatron reader gives its tensors HF names)
            return lambda: MegatronWeights(mg)
    if is_dcp(d) or _fsdp_dcp_dirs(d):
        return lambda: _dcp_weights(d)
    for sub in (d, os.path.join(d, "actor")):  # verl: global_step_N/actor/
        if is_verl_fsdp(sub):
            return lambda: FSDPShardedWeights(sub)
    tag = deepspeed_tag_dir(d)
    if tag is not None:
        return lambda: DeepSpeedWeights(tag)
    return None


def _open_index(path: str) -> LazyWeights:
    index = os.path.join(path, _INDEX)
    try:
        with open(_regular_file(index, "index"), encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except PyrankIOError:
        raise
    except Exception as exc:
        raise PyrankIOError(f"{index}: not a safetensors index ({short(exc)})") from None
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
    headers = {}
    for shard_path in sorted(set(files.values())):  # every shard must open and hold what the index says
        headers[shard_path] = present = _header(shard_path)
        lost = [n for n, p in files.items() if p == shard_path and n not in present]
        if lost:
            raise PyrankIOError(f"{shard_path}: lacks tensor {lost[0]!r} named by {index}")
    return LazyWeights(files, path, headers)


def _fsdp_dcp_dirs(path: str) -> List[str]:
    """The ``pytorch_model_fsdp_*/`` torch Distributed Checkpoints in directory ``path`` (what
    HF Trainer/accelerate FSDP runs with SHARDED_STATE_DICT write), by name."""
    from .dcp import is_dcp

    return sorted(d for d in os.listdir(path) if d.startswith("pytorch_model_fsdp_") and is_dcp(os.path.join(path, d)))


def _dcp_weights(path: str):
    """The torch Distributed Checkpoint in ``path``, or in its one ``pytorch_model_fsdp_*/``
    (whose keys carry accelerate's ``model.``)."""
    from .dcp import DCPWeights, is_dcp

    if is_dcp(path):
        return DCPWeights(path)
    subs = _fsdp_dcp_dirs(path)
    if len(subs) > 1:
        raise PyrankIOError(f"{path}: several FSDP model checkpoints ({', '.join(subs)}); give one of them")
    w = DCPWeights(os.path.join(path, subs[0]))
    if w and all(n.startswith("model.") for n in w):
        w.strip_prefix("model.")
    return w


_PATTERNS = [  # (regex on the entry name, where the weights may be inside it, first found wins)
    (re.compile(r"^checkpoint-(\d+)$"), ("",)),
    # verl: HF weights only with hf_model in checkpoint.save_contents, else the FSDP rank files
    (re.compile(r"^global_step_(\d+)$"), (os.path.join("actor", "huggingface"), "actor")),
    (re.compile(r"^global_step(\d+)_hf$"), ("",)),
    (re.compile(r"^global_step(\d+)$"), ("",)),  # DeepSpeed's tag directories (OpenRLHF: ckpt/_actor/)
    (re.compile(r"^iter_(\d+)$"), ("",)),  # Megatron-LM
]
_OPENRLHF_ACTOR = "_actor"


def _has_weights(d: str) -> bool:
    """Whether directory ``d`` holds model weights in a layout open_weights reads."""
    return os.path.isdir(d) and _layout(d) is not None


def _trainer_step(d: str) -> Optional[int]:
    p = os.path.join(d, "trainer_state.json")
    if os.path.exists(p):
        try:
            with open(p) as f:
                return int(json.load(f)["global_step"])
        except Exception:
            return None
    return None


_STEP_NAMES = [re.compile(r"checkpoint-(\d+)$"), re.compile(r"global_step_?(\d+)(_hf)?$"),
               re.compile(r"^iter_(\d+)$")]


def step_of(path: str) -> Optional[int]:
    """The training step of a checkpoint directory or file: ``trainer_state.json``'s
    ``global_step`` when present, else its name (``checkpoint-N``, ``global_step_N`` — also
    seen through verl's ``…/actor/huggingface`` — ``global_stepN_hf``, ``iter_N``); None if
    neither says."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-2:] == ["actor", "huggingface"]:  # verl
        parts = parts[:-2]
    elif parts[-1:] == ["actor"]:  # verl's FSDP rank files
        parts = parts[:-1]
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
    the folder name (``checkpoint-N``, ``global_step_N``, ``global_stepN_hf``, DeepSpeed's
    ``global_stepN``, Megatron-LM's ``iter_NNNNNNN``); an OpenRLHF ``ckpt/`` is searched in
    its ``_actor/``.
    """
    if not os.path.isdir(run_dir):
        raise PyrankIOError(f"{run_dir}: not a directory")
    found: Dict[int, str] = {}
    for entry in sorted(os.listdir(run_dir)):
        for pat, inners in _PATTERNS:
            mt = pat.match(entry)
            if not mt:
                continue
            dirs = [os.path.join(run_dir, entry, i) if i else os.path.join(run_dir, entry) for i in inners]
            have = [d for d in dirs if _has_weights(d)]
            d = have[0] if have else dirs[0]
            if not os.path.isdir(d):
                continue
            step = step_of(os.path.join(run_dir, entry))
            if step in found:
                raise PyrankIOError(f"{run_dir}: two checkpoints claim step {step}: {found[step]} and {d}")
            found[step] = d
    if not found and os.path.isdir(os.path.join(run_dir, _OPENRLHF_ACTOR)):
        return find_checkpoints(os.path.join(run_dir, _OPENRLHF_ACTOR))  # OpenRLHF: ckpt/_actor/global_stepN
    if not found:
        raise PyrankIOError(f"{run_dir}: no checkpoints (expected checkpoint-N/, global_step_N/actor/"
                            "huggingface/, global_stepN_hf/, DeepSpeed's global_stepN/ or Megatron's iter_N/ folders)")
    return sorted(found.items())
