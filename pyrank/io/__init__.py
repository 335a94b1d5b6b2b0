"""Checkpoint series in, checkpoints out (safetensors, lazy, one tensor at a time).

* :func:`open_weights` — a read-only, lazy mapping name → tensor for a HF model directory
  (one ``model.safetensors`` or shards + index), a ``.safetensors`` file, or a plain
  ``.pt``/``.bin`` state dict (loaded with ``weights_only=True`` only), and training
  frameworks' own checkpoints in place: torch DCP (``dcp.py``), verl FSDP2 rank files
  (``fsdp.py``), DeepSpeed ZeRO 1/2/3 (``deepspeed.py``), megatron-core torch_dist
  (``megatron.py``).
* :func:`find_checkpoints` — the (step, directory) series of a training run: transformers /
  TRL ``checkpoint-N/``, verl ``global_step_N/actor[/huggingface]/``, OpenRLHF
  ``global_stepN_hf/`` and ``_actor/global_stepN/``, Megatron-LM ``iter_NNNNNNN/``.
* :func:`select_modules` — the 2-D attention/MLP projection weights of the repeated blocks,
  recognized by more than Llama naming; ``include``/``exclude`` regexes override.
* :func:`write_hf_dir` — an HF model directory, written atomically, never into an input.

Errors are :class:`PyrankIOError` with a one-line message naming the file or tensor.
"""
from .errors import PyrankIOError
from .readers import LazyWeights, find_checkpoints, open_weights
from .select import select_modules
from .writers import write_hf_dir

__all__ = ["PyrankIOError", "LazyWeights", "open_weights", "find_checkpoints", "select_modules", "write_hf_dir"]
