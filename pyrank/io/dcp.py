"""torch Distributed Checkpoint (DCP) directories, read one tensor at a time, no process group.

What writes them: ``torch.distributed.checkpoint.save`` (e.g. of an FSDP2 model's sharded
state dict), and HF Trainer/accelerate FSDP runs with ``SHARDED_STATE_DICT``
(``checkpoint-N/pytorch_model_fsdp_0/``, keys prefixed ``model.``). A DCP directory holds
``.metadata`` (a pickle: every tensor's dtype, size and chunks, and where each chunk's
bytes are) and ``__R_I.distcp`` files (each chunk ``torch.save``-serialized at an offset).

Reading a tensor reads only its chunks' byte ranges (``rows(name, a, b)``: only the chunks
holding those rows, e.g. one layer of Megatron's layer-stacked tensors). A chunk whose
archive holds one contiguous tensor in a stored little-endian record — what DCP writes — is
read straight from that record into its place in the result (one ``readinto``; a column
block goes through one temporary): its ``data.pkl`` is read by ``_RecordUnpickler``, which
only describes the tensor (record, dtype, offset, size, stride) and admits nothing else.
Any other archive goes through ``torch.load(weights_only=True)`` and is copied into place.

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
import math
import os
import pickle
from collections.abc import Mapping
from typing import Dict, List, Tuple

import torch

from .errors import PyrankIOError, short
from .unpickle import Record, TensorPropertiesRecord

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


# DCP's own classes become inert records (resolving them would import torch.distributed.checkpoint: ~0.7 s)
_STAND_INS = {(module, name): type(name, (TensorPropertiesRecord if name == "TensorProperties" else Record,), {})
              for module, names in _ALLOWED.items() if module.startswith("torch.distributed.checkpoint")
              for name in names}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
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
            sd_meta = meta.state_dict_metadata
            # keyed as DCP's MetadataIndex compares: by tensor name and chunk offset
            storage = {(k.fqn, tuple(getattr(k, "offset", None) or ())): v for k, v in meta.storage_data.items()}
        except Exception as exc:
            raise PyrankIOError(f"{meta_path}: not a readable DCP metadata file ({short(exc)})") from None
        self._tensors: Dict[str, Tuple[object, List[Tuple[tuple, tuple, object]]]] = {}
        for fqn, md in sd_meta.items():
            if not hasattr(md, "chunks"):  # BytesStorageMetadata: pickled objects, never read
                continue
            chunks = []
            for i, ch in enumerate(md.chunks):
                info = storage.get((fqn, tuple(ch.offsets)))
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
        dtype = md.properties.dtype
        lo, hi = span if span is not None else (0, 1)
        want = (hi - lo,) + whole[1:] if span is not None else whole
        out = torch.empty(want, dtype=dtype)
        for offsets, sizes, info in chunks:
            offsets, sizes = tuple(offsets), tuple(sizes)
            if span is not None:
                a, b = max(lo, offsets[0]), min(hi, offsets[0] + sizes[0])
                if a >= b:
                    continue  # none of the asked rows in this chunk: not read
            else:
                a, b = (offsets[0], offsets[0] + sizes[0]) if sizes else (0, 1)
            p = os.path.join(self.path, str(info.relative_path))
            # where the chunk's rows [a, b) go in ``out``
            dst = (slice(a - lo, b - lo),) + tuple(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:])) \
                if sizes else ()
            try:
                with open(p, "rb") as f:
                    rec = _raw_record(f, info)
                    if rec is not None:  # the chunk's bytes straight into place (or one temporary)
                        start, got_dtype, got_size = rec
                        if got_dtype != dtype or got_size != sizes:
                            raise PyrankIOError(f"{p}: chunk of tensor {name!r} is not the {list(sizes)} {dtype} "
                                                "its metadata says")
                        row = math.prod(sizes[1:]) * out.element_size() if sizes else out.element_size()
                        target = out[dst]
                        in_place = target.is_contiguous()  # whole rows of ``out``: read straight there
                        if not in_place:  # a column block: read it whole, then copy it into place
                            target = torch.empty(target.shape, dtype=dtype)
                        _read_exact(f, start + (a - offsets[0]) * row if sizes else start, target, p)
                        if not in_place:
                            out[dst] = target
                        continue
                    # not a plain little-endian stored record: torch's own loader
                    chunk = torch.load(_Slice(f, info.offset, info.length), map_location="cpu", weights_only=True)
            except PyrankIOError:
                raise
            except Exception as exc:
                raise PyrankIOError(f"{p}: cannot read chunk of tensor {name!r} ({short(exc)})") from None
            if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != sizes or chunk.dtype != dtype:
                raise PyrankIOError(f"{p}: chunk of tensor {name!r} is not the {list(sizes)} {dtype} its metadata says")
            out[dst] = chunk[a - offsets[0]:b - offsets[0]] if sizes else chunk
        return out

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


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _RecordUnpickler(pickle.Unpickler):
    """Reads a chunk archive's data.pkl as a description of one tensor — its storage record,
    dtype, offset, size and stride — and builds nothing; anything but one plain tensor is
    refused (the caller then falls back to torch.load)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("dtype", _STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], tuple)):
            raise pickle.UnpicklingError("not a storage record")
        return ("storage", pid[1][1], str(pid[2]), int(pid[4]))


def _raw_record(f, info):
    """(absolute file offset of the chunk tensor's first byte, dtype, size) when the chunk's
    torch.save archive holds one contiguous tensor in a stored (uncompressed), little-endian
    record; else None."""
    import struct
    import zipfile

    try:
        z = zipfile.ZipFile(_Slice(f, info.offset, info.length))
        names = {zi.filename: zi for zi in z.infolist()}
        pkl = [n for n in names if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            return None
        prefix = pkl[0][:-len("data.pkl")]
        order = names.get(prefix + "byteorder")
        if order is not None and z.read(order) != b"little":
            return None
        desc = _RecordUnpickler(io.BytesIO(z.read(pkl[0]))).load()
        kind, storage, offset, size, stride = desc
        _, dtype, key, numel = storage
        rec = names.get(prefix + "data/" + key)
        if kind != "tensor" or rec is None or rec.compress_type != zipfile.ZIP_STORED:
            return None
        item = torch.empty(0, dtype=dtype).element_size()
        contiguous, acc = [], 1
        for n in reversed(size):
            contiguous.insert(0, acc)
            acc *= n
        if (math.prod(size) > 1 and list(stride) != contiguous) or offset + math.prod(size) > numel \
                or rec.file_size != numel * item:
            return None
        f.seek(info.offset + rec.header_offset)
        head = f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.offset + rec.header_offset + 30 + name_len + extra_len + offset * item
        return start, dtype, tuple(size)
    except Exception:
        return None


def _read_exact(f, start: int, into: torch.Tensor, path: str) -> None:
    """``into``'s bytes from ``f`` at ``start``, or an error naming ``path`` if it ends early."""
    view = memoryview(into.reshape(-1).view(torch.uint8).numpy()) if into.numel() else memoryview(b"")
    f.seek(start)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise PyrankIOError(f"{path}: ends inside a chunk (truncated?)")
        got += n
