"""torch Distributed Checkpoint (DCP) directories, read one tensor at a time, no process group.

What writes them: ``torch.distributed.checkpoint.save`` (e.g. of an FSDP2 model's sharded
state dict), and HF Trainer/accelerate FSDP runs with ``SHARDED_STATE_DICT``
(``checkpoint-N/pytorch_model_fsdp_0/``, keys prefixed ``model.``). A DCP directory holds
``.metadata`` (a pickle: every tensor's dtype, size and chunks, and where each chunk's
bytes are) and ``__R_I.distcp`` files (each chunk ``torch.save``-serialized at an offset).

Reading a tensor reads only its chunks' byte ranges; each chunk is deserialized with
``torch.load(weights_only=True)`` and copied into place in the full tensor.

Safety: torch's own reader unpickles ``.metadata`` with plain ``pickle.load`` (arbitrary
code). pyrank unpickles it with a restricted unpickler that resolves only the globals a DCP
metadata file contains — DCP's metadata dataclasses (``torch.distributed.checkpoint.
metadata``: Metadata, TensorStorageMetadata, ChunkStorageMetadata, TensorProperties,
BytesStorageMetadata, MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING), its ``_StorageInfo``,
``torch.Size``, torch dtypes and layouts, and ``pathlib`` paths — and refuses anything else
by name. Chunks compressed or otherwise transformed by storage extensions are refused.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from typing import Dict, List, Tuple

import torch

from .errors import PyrankIOError, short

METADATA = ".metadata"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # Megatron-core's torch_dist format also pickles its cached save plans into .metadata
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}
_TORCH_NAMES = {"Size", "strided", "sparse_coo", "sparse_csr"} | {
    str(d).split(".")[1] for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module == "torch" and name in _TORCH_NAMES) or name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a DCP metadata file")


def is_dcp(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


class DCPWeights(Mapping):
    """name → tensor of a DCP directory (see the module doc)."""

    layout = "torch Distributed Checkpoint (.metadata + .distcp)"

    def __init__(self, path: str):
        from .readers import _regular_file

        self.path = self.source = path
        meta_path = _regular_file(os.path.join(path, METADATA), "DCP metadata file")
        try:
            with open(meta_path, "rb") as f:
                meta = _MetadataUnpickler(f).load()
            sd_meta, storage = meta.state_dict_metadata, meta.storage_data
        except Exception as exc:
            raise PyrankIOError(f"{meta_path}: not a readable DCP metadata file ({short(exc)})") from None
        self._tensors: Dict[str, Tuple[object, List[Tuple[tuple, tuple, object]]]] = {}
        for fqn, md in sd_meta.items():
            if not hasattr(md, "chunks"):  # BytesStorageMetadata: pickled objects, never read
                continue
            chunks = []
            for i, ch in enumerate(md.chunks):
                info = storage.get(_index(fqn, ch.offsets, i))
                if info is None:
                    raise PyrankIOError(f"{meta_path}: no storage entry for chunk {i} of {fqn!r}")
                if getattr(info, "transform_descriptors", None):
                    raise PyrankIOError(f"{meta_path}: {fqn!r} is stored with extensions "
                                        f"{list(info.transform_descriptors)} (compressed?); not supported")
                rel = str(info.relative_path)
                if os.path.isabs(rel) or os.path.dirname(os.path.normpath(rel)) or rel in ("", ".", ".."):
                    raise PyrankIOError(f"{meta_path}: chunk file {rel!r} of {fqn!r} is not a file in {path}")
                chunks.append((tuple(ch.offsets), tuple(ch.sizes), info))
            self._tensors[fqn] = (md, chunks)
        files = {c[2].relative_path for _, cs in self._tensors.values() for c in cs}
        # every file the checkpoint consists of (what `pyrank watch` checks for stability)
        self._files = [meta_path] + [os.path.join(path, rel) for rel in sorted(files)]
        for rel in sorted(files):
            p = os.path.join(path, rel)
            if not os.path.isfile(p):
                raise PyrankIOError(f"{p}: chunk file named by {meta_path} is missing (half-written checkpoint?)")
            size = os.path.getsize(p)
            ends = [c[2].offset + c[2].length for _, cs in self._tensors.values() for c in cs
                    if c[2].relative_path == rel]
            if ends and max(ends) > size:
                raise PyrankIOError(f"{p}: {size} bytes, but {meta_path} places a chunk up to byte {max(ends)} "
                                    "(truncated?)")

    def strip_prefix(self, prefix: str) -> None:
        """Drop ``prefix`` from every name that has it (accelerate saves ``{"model": state_dict}``)."""
        self._tensors = {(n[len(prefix):] if n.startswith(prefix) else n): v for n, v in self._tensors.items()}

    def shape_dtype(self, name):
        md, _ = self._tensors[name]
        return tuple(md.size), str(md.properties.dtype)

    def nbytes(self, name) -> int:
        md, _ = self._tensors[name]
        return md.size.numel() * torch.empty(0, dtype=md.properties.dtype).element_size()

    def file_of(self, name) -> str:
        return os.path.join(self.path, str(self._tensors[name][1][0][2].relative_path)) \
            if self._tensors[name][1] else self.path

    def __getitem__(self, name):
        if name not in self._tensors:
            raise KeyError(name)
        size = tuple(self._tensors[name][0].size)
        return self.rows(name, 0, size[0]) if size else self._read(name, None)

    def rows(self, name, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` (along its first axis): only the chunks that
        hold some of them are read (e.g. one layer of Megatron's layer-stacked tensors)."""
        size = tuple(self._tensors[name][0].size)
        if not size or not 0 <= start <= stop <= size[0]:
            raise IndexError(f"rows [{start}, {stop}) of {name!r} {list(size)}")
        return self._read(name, (start, stop))

    def _read(self, name, span):
        md, chunks = self._tensors[name]
        whole = tuple(md.size)
        lo, hi = span if span is not None else (0, 1)
        want = (hi - lo,) + whole[1:] if span is not None else whole
        out = None
        for offsets, sizes, info in chunks:
            if span is not None and not (offsets[0] < hi and lo < offsets[0] + sizes[0]):
                continue  # none of the asked rows in this chunk: not read
            p = os.path.join(self.path, str(info.relative_path))
            try:
                with open(p, "rb") as f:  # torch.load reads the chunk's archive in place: no bytes copy
                    chunk = torch.load(_Slice(f, info.offset, info.length), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise PyrankIOError(f"{p}: cannot read chunk of tensor {name!r} ({short(exc)})") from None
            if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != tuple(sizes) \
                    or chunk.dtype != md.properties.dtype:
                raise PyrankIOError(f"{p}: chunk of tensor {name!r} is not the {list(sizes)} "
                                    f"{md.properties.dtype} its metadata says")
            if tuple(sizes) == want and (span is None or offsets[0] == lo):
                return chunk  # exactly what was asked: already a tensor of its own
            if out is None:
                out = torch.empty(want, dtype=md.properties.dtype)
            if span is not None:  # the chunk's rows inside [lo, hi)
                a, b = max(lo, offsets[0]), min(hi, offsets[0] + sizes[0])
                chunk = chunk[a - offsets[0]:b - offsets[0]]
                offsets = (a - lo,) + tuple(offsets[1:])
                sizes = (b - a,) + tuple(sizes[1:])
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = chunk
        return out if out is not None else torch.empty(want, dtype=md.properties.dtype)

    def __contains__(self, name):
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable read-only stream (one
    chunk's torch.save archive inside a .distcp file); reading past it is end of file."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._lo, self._len, self._pos = f, offset, length, 0
        f.seek(0, os.SEEK_END)
        if f.tell() < offset + length:
            raise EOFError("file ends early")

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._lo + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got or 0
        return got


def _index(fqn, offsets, i):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn, torch.Size(offsets), i)
