"""pyrank inside training loops.

* :class:`TrainingTracker` — plain PyTorch: snapshot the base weights, then call
  ``.step(model, step)`` from any loop (custom, verl, OpenRLHF, TraceRL-style trainers).
* ``pyrank.integrations.transformers.Rank1Callback`` — the same as a ``transformers``
  ``TrainerCallback`` (TRL's trainers subclass ``Trainer``). Imported only from that
  submodule: ``import pyrank`` and ``import pyrank.integrations`` never import transformers.
"""
from .tracking import TrainingTracker, full_weights, unwrap_model

__all__ = ["TrainingTracker", "full_weights", "unwrap_model"]
