"""Write a loadable HF model directory atomically (never into or over an input)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Iterable, Optional

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
    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, inputs, force)
    modified = set(modified)

    def fill(tmp):
        shards, current, size = [], {}, 0

        def flush():
            nonlocal current, size
            if current:
                shards.append(current)
                save_file(current, os.path.join(tmp, f"shard-{len(shards):05d}.safetensors"),
                          metadata={"format": "pt"})
                current, size = {}, 0

        names = list(weights)
        for i, name in enumerate(names):
            t = weights[name]
            if name in modified and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PyrankIOError(f"tensor {name!r}: the result contains NaN or Inf; nothing was written")
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t.contiguous()
            size += nbytes
            if progress:
                progress(i + 1, len(names), name)
        flush()
        n = len(shards)
        files = []
        for i in range(n):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp, f"shard-{i + 1:05d}.safetensors"), os.path.join(tmp, final))
            files.append(final)
        if n > 1:
            weight_map = {name: files[i] for i, shard in enumerate(shards) for name in shard}
            total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
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

    try:
        atomic_dir(out_dir, fill)
    except PyrankIOError:
        raise
    except Exception as exc:  # OSError, or safetensors' own error for a full disk
        why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200] or type(exc).__name__
        raise PyrankIOError(f"{out_dir}: writing failed ({why}); nothing was written") from None
