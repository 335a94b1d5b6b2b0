"""A checkpoint series kept as revisions of one Hub repo (``step_50``, ``step_100``, …), read
from the local Hugging Face cache — offline, through ``huggingface_hub``'s own cache scanner.
Each matching revision's snapshot directory is an ordinary HF model directory (shards are
symlinks into ``blobs/``), opened like any other checkpoint."""
from __future__ import annotations

import fnmatch
import re
from typing import List, Optional, Tuple

from .errors import PyrankIOError, short


def hub_revisions(repo_id: str, pattern: str = "*", cache_dir: Optional[str] = None) -> List[Tuple[int, str]]:
    """[(step, snapshot directory)] of the cached revisions of model repo ``repo_id`` whose ref
    names (branches, tags) match the glob ``pattern``, sorted by step; the step is the last
    number in the ref name. Nothing is downloaded."""
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        raise PyrankIOError("--hf-repo needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        info = scan_cache_dir(cache_dir)
    except Exception as exc:
        where = cache_dir or "the Hugging Face cache"
        raise PyrankIOError(f"{where}: cannot scan it ({short(exc)})") from None
    repos = [r for r in info.repos if r.repo_id == repo_id and r.repo_type == "model"]
    if not repos:
        have = sorted(r.repo_id for r in info.repos if r.repo_type == "model")
        raise PyrankIOError(f"{repo_id}: not in the cache {cache_dir or ''} (cached models: "
                            f"{', '.join(have[:8]) or 'none'}); pyrank reads the cache only, it never downloads")
    found, refs = {}, []
    for rev in repos[0].revisions:
        for ref in sorted(rev.refs):
            refs.append(ref)
            if not fnmatch.fnmatchcase(ref, pattern):
                continue
            nums = re.findall(r"\d+", ref)
            if not nums:
                raise PyrankIOError(f"{repo_id}: revision {ref!r} matches {pattern!r} but has no step number in "
                                    "its name")
            step = int(nums[-1])
            if step in found:
                raise PyrankIOError(f"{repo_id}: revisions {found[step][0]!r} and {ref!r} both name step {step}")
            found[step] = (ref, str(rev.snapshot_path))
    if not found:
        raise PyrankIOError(f"{repo_id}: no cached revision matches {pattern!r} (cached refs: "
                            f"{', '.join(sorted(refs)[:12]) or 'none'})")
    return sorted((s, p) for s, (_, p) in found.items())
