"""Scale-out with torch.distributed: ``torchrun --nproc-per-node N -m pyrank analyze …``.

The modules are split across ranks by size (:func:`shard_by_size`); each rank reads and
analyzes only its own tensors, and the results meet on rank 0 (:meth:`World.all_gather`
over a gloo group, so it works the same for NCCL GPU ranks). GPU ranks use NCCL, CPU ranks
gloo; torchrun's rendezvous does the rest (multi-node included), with nothing
pyrank-specific to set up. Without torchrun (no ``WORLD_SIZE`` > 1) everything is a
single process and no process group is created.

Results equal a single-process run's exactly when each rank uses the same number of
threads as that run (the CPU kernels' reduction order depends on the thread count;
torchrun sets ``OMP_NUM_THREADS=1`` unless told otherwise).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

__all__ = ["World", "shard_by_size"]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    _group: Any = None
    _owns: bool = False

    @classmethod
    def from_env(cls) -> "World":
        """The torchrun world (``RANK``/``WORLD_SIZE``), or a single process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            backend = os.environ.get("PYRANK_DIST_BACKEND") or ("nccl" if cuda else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            owns = True
        # Python objects (results, errors) travel over gloo whatever the main backend is.
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), group, owns)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_gather(self, obj) -> List[Any]:
        """Every rank's ``obj``, in rank order (a single-element list without torchrun)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def on_all(self, fn, describe) -> Tuple[List[Any], Optional[str]]:
        """``fn()`` on every rank; returns (every rank's result in rank order, None), or
        ([], message) on every rank when any rank raised — ``describe(exc)`` of the first
        one — so no rank waits forever for a failed one. Without torchrun, ``fn()``'s own
        exception propagates."""
        if not self.distributed:
            return [fn()], None
        try:
            mine = ("ok", fn())
        except Exception as exc:
            mine = ("error", describe(exc))
        parts = self.all_gather(mine)
        for status, value in parts:
            if status == "error":
                return [], value
        return [value for _, value in parts], None

    def close(self) -> None:
        if self._owns:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns = False


def shard_by_size(items: Sequence[Tuple[str, int]], world: int) -> List[List[str]]:
    """Split (name, cost) items over ``world`` ranks: largest first, each to the least loaded
    rank (ties: the lowest rank). Deterministic; each rank's names keep the input order."""
    order = {n: i for i, (n, _) in enumerate(items)}
    load = [0] * world
    owner = {}
    for name, cost in sorted(items, key=lambda it: (-it[1], order[it[0]])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += cost
    return [[n for n, _ in items if owner[n] == r] for r in range(world)]
