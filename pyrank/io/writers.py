"""Write a loadable HF model directory atomically (never into or over an input)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import PyrankIOError

# Files copied from the base directory so the output loads like the base did.
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
         "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(out_dir: str, inputs: Iterable[str], force: bool) -> None:
    """Refuse an output that is, contains or lies inside an input, or exists without force."""
    for src in inputs:
        if src and (_inside(out_dir, src) or _inside(src, out_dir)):
            raise PyrankIOError(f"{out_dir}: refusing to write into or over the input {src}")
    if os.path.exists(out_dir) and not force:
        raise PyrankIOError(f"{out_dir}: already exists (pass --force to replace it)")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(path: str, fill) -> None:
    """Create directory ``path`` atomically: ``fill(tmp)`` writes into a temporary sibling,
    which is fsynced and renamed into place (replacing an existing ``path`` by a swap).
    On any exception the temporary directory is removed and ``path`` is untouched."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        fill(tmp)
        for root, _, files in os.walk(tmp):
            for fn in files:
                fd = os.open(os.path.join(root, fn), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(root)
        if os.path.exists(path):  # swap the old directory out, the new one in
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(tmp: str, weights: Mapping, names, prefix: str, max_shard_bytes: int, modified: set,
                  progress=None) -> List[Tuple[str, List[str], int]]:
    """Write ``names`` from ``weights`` into ``tmp/<prefix>NNNNN.safetensors`` files of at most
    ``max_shard_bytes``; returns [(file name, tensor names, bytes)]."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            fn = f"{prefix}{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(tmp, fn), metadata={"format": "pt"})
            shards.append((fn, list(current), size))
            current, size = {}, 0

    names = list(names)
    for i, name in enumerate(names):
        t = weights[name]
        if name in modified and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PyrankIOError(f"tensor {name!r}: the result contains NaN or Inf; nothing was written")
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t.detach().cpu().contiguous()  # a no-op for CPU tensors
        size += nbytes
        if progress:
            progress(i + 1, len(names), name)
    flush()
    return shards


def _finalize(tmp: str, shards, base_dir: Optional[str], extra_files: Optional[dict]) -> None:
    """Give the shards their final names (``model.safetensors``, or ``model-i-of-n`` plus
    the index), copy the base directory's config/tokenizer files, write ``extra_files``."""
    n = len(shards)
    weight_map, total = {}, 0
    for i, (fn, names, nbytes) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(tmp, fn), os.path.join(tmp, final))
        weight_map.update((name, final) for name in names)
        total += nbytes
    if n > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    if base_dir and os.path.isdir(base_dir):
        for fn in _COPY:
            src = os.path.join(base_dir, fn)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(tmp, fn))
    for fn, obj in (extra_files or {}).items():
        with open(os.path.join(tmp, fn), "w") as f:
            json.dump(obj, f, indent=1)


def _io_error(out_dir, exc):
    if isinstance(exc, PyrankIOError):
        return exc
    why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200] or type(exc).__name__
    return PyrankIOError(f"{out_dir}: writing failed ({why}); nothing was written")


def write_hf_dir(out_dir: str, weights: Mapping, *, base_dir: Optional[str] = None, inputs: Iterable[str] = (),
                 force: bool = False, modified: Iterable[str] = (), max_shard_bytes: int = 2 << 30,
                 extra_files: Optional[dict] = None, progress=None) -> None:
    """Write ``weights`` (a mapping, read one tensor at a time) as an HF model directory.

    Shards of at most ``max_shard_bytes`` plus ``model.safetensors.index.json`` when more
    than one, else ``model.safetensors``; config/tokenizer/generation files copied from
    ``base_dir``; ``extra_files`` (name → JSON-able object) written beside them. Tensors in
    ``modified`` are checked for NaN/Inf first. Atomic: everything goes to a temporary
    sibling directory, is fsynced, and is renamed into place only when complete; on any
    failure (a full disk included) nothing is left behind.
    """
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, inputs, force)
    modified = set(modified)

    def fill(tmp):
        shards = _write_shards(tmp, weights, list(weights), "shard-", max_shard_bytes, modified, progress)
        _finalize(tmp, shards, base_dir, extra_files)

    try:
        atomic_dir(out_dir, fill)
    except Exception as exc:  # OSError, or safetensors' own error for a full disk
        raise _io_error(out_dir, exc) from None


def write_hf_dir_sharded(out_dir: str, weights: Mapping, my_names: Sequence[str], world, *,
                         base_dir: Optional[str] = None, inputs: Iterable[str] = (), force: bool = False,
                         modified: Iterable[str] = (), max_shard_bytes: int = 2 << 30,
                         extra_files: Optional[dict] = None, progress=None) -> None:
    """:func:`write_hf_dir` across the ranks of ``world`` (a :class:`pyrank.distributed.World`):
    every rank writes its own tensors ``my_names`` as shard files into one temporary
    directory, rank 0 the index and the copied files, and renames it into place when every
    rank succeeded. Every rank must call it; every rank raises the same error on failure,
    and then nothing is left behind. The directory needs a filesystem all ranks share."""
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, inputs, force)
    modified = set(modified)

    # The collectives, in order, on every rank: (1) rank 0's temporary directory (None if
    # it could not make one), (2) each rank's shards or error, (3) rank 0's final status.
    def rank_shards(tmp):
        parts, err = world.on_all(
            lambda: _write_shards(tmp, weights, my_names, f"rank{world.rank:05d}-", max_shard_bytes, modified,
                                  progress),
            lambda exc: str(_io_error(out_dir, exc)))
        if err:
            raise PyrankIOError(err)
        return [sh for shards in parts for sh in shards]

    if world.rank == 0:
        shared = [False]

        def fill(tmp):
            world.all_gather(tmp)
            shared[0] = True
            _finalize(tmp, rank_shards(tmp), base_dir, extra_files)

        try:
            atomic_dir(out_dir, fill)
            status = ("ok",)
        except Exception as exc:
            status = ("error", str(_io_error(out_dir, exc)))
            if not shared[0]:
                world.all_gather(None)
        world.all_gather(status)
    else:
        tmp = world.all_gather(None)[0]
        if tmp is not None:
            try:
                rank_shards(tmp)
            except PyrankIOError:
                pass  # rank 0 saw the same error and reports it in its status
        status = world.all_gather(None)[0]
    if status[0] == "error":
        raise PyrankIOError(status[1])
