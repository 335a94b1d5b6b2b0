"""Write a loadable HF model directory atomically (never into or over an input)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
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


def write_json(path: str, obj) -> None:
    """A JSON file (inside a directory being filled for :func:`atomic_dir`)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # (the only portable way to read it)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings of ``path`` left by writers
    that were killed (their process is gone); those of live writers stay."""
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        for kind in (".tmp-", ".old-"):
            head = f".{base}{kind}"
            if entry.startswith(head):
                pid = entry[len(head):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def atomic_dir(path: str, fill, *, replace: bool = True) -> None:
    """Create directory ``path`` atomically: ``fill(tmp)`` writes into a temporary sibling
    (``.NAME.tmp-PID-…``), which is fsynced, given the umask's permissions and renamed into
    place. On any exception (KeyboardInterrupt and SystemExit included) the temporary
    directory is removed and ``path`` is untouched.

    ``replace=True`` swaps out an existing ``path``; ``replace=False`` never does: if
    another process created ``path`` meanwhile, the rename fails, this call raises
    :class:`PyrankIOError` and the other output stays as it was. Temporaries of killed
    writers to the same ``path`` are removed first."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)
    try:
        fill(tmp)
        # fsync everything, and give it the modes a plain mkdir/open would have: mkdtemp makes
        # 0700 and some writers 0600 files, which other users of a shared cluster cannot read
        mask = _umask()
        for root, _, files in os.walk(tmp):
            for fn in files:
                os.chmod(os.path.join(root, fn), 0o666 & ~mask)
                fd = os.open(os.path.join(root, fn), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.chmod(root, 0o777 & ~mask)
            _fsync_dir(root)
        if replace and os.path.exists(path):  # swap the old directory out, the new one in
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-{os.getpid()}-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # rename(2) onto an existing non-empty directory fails (EEXIST/ENOTEMPTY), onto a
            # file too (ENOTDIR): exactly one of two racing writers gets the name
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if os.path.exists(path):
                    raise PyrankIOError(f"{path}: already exists (another process wrote it meanwhile; "
                                        "pass --force to replace it)") from None
                raise exc
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
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            if name in modified:
                raise PyrankIOError(f"tensor {name!r}: the result contains NaN or Inf; nothing was written")
            # an input's own non-finite values (often unused buffers): carried over, said aloud
            warnings.warn(f"tensor {name!r} contains NaN or Inf; it is copied unchanged from the input",
                          UserWarning, stacklevel=2)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t.detach().cpu().contiguous()  # a no-op for CPU tensors
        size += nbytes
        if progress:
            progress(i + 1, len(names), name)
    flush()
    return shards


def _finalize(tmp: str, shards, base_dir: Optional[str], extra_files: Optional[dict],
              config_dtype: Optional[str] = None) -> None:
    """Give the shards their final names (``model.safetensors``, or ``model-i-of-n`` plus
    the index), copy the base directory's config/tokenizer files (config.json's dtype set to
    ``config_dtype`` when given, so ``torch_dtype="auto"`` loads what was written), write
    ``extra_files``."""
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
            if not os.path.exists(src):
                continue
            if fn == "config.json" and config_dtype is not None:
                with open(src) as f:
                    cfg = json.load(f)
                cfg["torch_dtype"] = config_dtype  # transformers 4's key
                if "dtype" in cfg:  # transformers 5's
                    cfg["dtype"] = config_dtype
                write_json(os.path.join(tmp, fn), cfg)
            else:
                shutil.copyfile(src, os.path.join(tmp, fn))
    for fn, obj in (extra_files or {}).items():
        write_json(os.path.join(tmp, fn), obj)


def _io_error(out_dir, exc):
    if isinstance(exc, PyrankIOError):
        return exc
    why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200] or type(exc).__name__
    return PyrankIOError(f"{out_dir}: writing failed ({why}); nothing was written")


def write_hf_dir(out_dir: str, weights: Mapping, *, base_dir: Optional[str] = None, inputs: Iterable[str] = (),
                 force: bool = False, modified: Iterable[str] = (), max_shard_bytes: int = 2 << 30,
                 extra_files: Optional[dict] = None, progress=None, config_dtype: Optional[str] = None) -> None:
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
        _finalize(tmp, shards, base_dir, extra_files, config_dtype)

    try:
        atomic_dir(out_dir, fill, replace=force)
    except Exception as exc:  # OSError, or safetensors' own error for a full disk
        raise _io_error(out_dir, exc) from None


def write_hf_dir_sharded(out_dir: str, weights: Mapping, my_names: Sequence[str], world, *,
                         base_dir: Optional[str] = None, inputs: Iterable[str] = (), force: bool = False,
                         modified: Iterable[str] = (), max_shard_bytes: int = 2 << 30,
                         extra_files: Optional[dict] = None, progress=None,
                         config_dtype: Optional[str] = None) -> None:
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
            _finalize(tmp, rank_shards(tmp), base_dir, extra_files, config_dtype)

        try:
            atomic_dir(out_dir, fill, replace=force)
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
