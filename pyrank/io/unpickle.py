"""What pyrank's restricted unpicklers turn framework objects into, and its one guarded
``torch.load``.

Training frameworks pickle small metadata objects beside their tensors (DCP's chunk tables,
ShardedTensor metadata, DeepSpeed's stage enum and loss scaler). The readers never resolve
those classes to the real ones — that would run their code, or import all of
``torch.distributed.checkpoint`` — but to the inert records here: the pickled fields and
nothing else.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import PyrankIOError, short


class Record:
    """An inert stand-in for a pickled object: its fields, nothing else (no method of the
    real class exists, and none of its code runs)."""

    def __init__(self, *args):  # what REDUCE of the class passes, e.g. an enum's value
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(x is None or isinstance(x, dict) for x in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) as pickle gives them
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class TensorPropertiesRecord(Record):
    """DCP's and ShardedTensor's ``TensorProperties``: pickled as a tuple, dtype first."""

    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(state, tuple) and state and isinstance(state[0], torch.dtype):
            self.dtype = state[0]


def int_value(value) -> int:
    """An int enum rebuilt from its value (ZeroStageEnum, MEM_FORMAT_ENCODING)."""
    return int(value)


def load_weights_only(path: str, hint: str, stand_ins: Sequence = ()):
    """``torch.load(path, weights_only=True, mmap=True)`` on the CPU — nothing read until a
    tensor is touched — with ``stand_ins`` ((object, "module.Name") pairs) admitted beside
    torch's own allowlist; a failure is one line naming the file, then ``hint``."""
    try:
        if stand_ins:
            with torch.serialization.safe_globals(list(stand_ins)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise PyrankIOError(f"{path}: not loadable with torch.load(weights_only=True) ({short(exc)}); "
                            f"{hint}") from None
