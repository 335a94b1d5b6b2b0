"""Megatron-core ``dist_checkpointing`` checkpoints (the ``torch_dist`` format), read under the
HF model's names without converting them first.

What writes them: Megatron-LM (``CKPT/iter_NNNNNNN/``, with ``latest_checkpointed_iteration.txt``)
and verl's megatron backend (``global_step_N/actor/dist_ckpt/``, the HF config in
``actor/huggingface/``). A checkpoint directory holds ``metadata.json``
(``"sharded_backend": "torch_dist"``), ``common.pt`` (never opened: non-tensor state) and a
torch Distributed Checkpoint (``.metadata`` + ``__R_I.distcp``) of *global* tensors:
tensor-parallel shards are chunks of them, so reading a tensor re-joins its TP shards
(:class:`pyrank.io.dcp.DCPWeights`). Repeated layers are stacked along a leading layer
axis (``decoder.layers.<param>``: [num_layers, …]); one layer is read alone (only its chunks).

Mapping to HF (Llama / Qwen2 / Qwen3 / Mistral dense decoders; from the HF ``config.json``:
``num_attention_heads`` n, ``num_key_value_heads`` g, ``head_dim`` d or hidden/n):

* ``self_attention.linear_qkv.weight`` (and ``.bias``): rows grouped by query group, each
  group [its n/g query heads, its key head, its value head] × d rows. ``q_proj`` is every
  group's query rows, ``k_proj`` the key rows, ``v_proj`` the value rows, in group order —
  the split megatron-core's own ``SelfAttention.get_query_key_value_tensors`` makes.
* ``mlp.linear_fc1.weight`` with a gated unit: [gate; up] (the global layout the SwiGLU
  sharded factory saves, independent of the TP size): ``gate_proj`` the first half of the
  rows, ``up_proj`` the second; ``linear_fc2`` → ``down_proj``; ``linear_proj`` → ``o_proj``.
* ``linear_qkv.layer_norm_weight`` / ``input_layernorm.weight`` → ``input_layernorm``;
  ``linear_fc1.layer_norm_weight`` / ``pre_mlp_layernorm.weight`` → ``post_attention_layernorm``;
  ``q_layernorm``/``k_layernorm`` → ``self_attn.q_norm``/``k_norm``; embedding (its rows cut to
  the config's ``vocab_size``: Megatron pads the vocabulary), ``final_layernorm`` → ``model.norm``,
  ``output_layer`` → ``lm_head``.

Anything else (MoE experts, MLA, gated attention, pipeline-stage-local layer numbering) is
refused by name: not mapped yet. The tests check every mapped tensor against what
megatron-core's own modules compute with the weights it saved.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import torch

from .dcp import DCPWeights, is_dcp
from .errors import PyrankIOError, short

METADATA_JSON = "metadata.json"
_LAYER = "decoder.layers."
# megatron per-layer parameter → (HF name under model.layers.{i}., how to cut it)
_PER_LAYER = {
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "q"), ("self_attn.k_proj.weight", "k"),
                                         ("self_attn.v_proj.weight", "v")),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "q"), ("self_attn.k_proj.bias", "k"),
                                       ("self_attn.v_proj.bias", "v")),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight", None),),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "gate"), ("mlp.up_proj.weight", "up")),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight", None),),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight", None),),
    "input_layernorm.weight": (("input_layernorm.weight", None),),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight", None),),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight", None),),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight", None),),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight", None),),
}
_GLOBAL = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight",
           "output_layer.weight": "lm_head.weight"}


def is_megatron(path: str) -> bool:
    """Whether ``path`` is a megatron-core torch_dist checkpoint directory."""
    p = os.path.join(path, METADATA_JSON)
    if not (is_dcp(path) and os.path.isfile(p)):
        return False
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False


def megatron_dir(path: str) -> Optional[str]:
    """The megatron checkpoint ``path`` is or holds (verl: ``actor/dist_ckpt/``)."""
    for d in (path, os.path.join(path, "dist_ckpt")):
        if is_megatron(d):
            return d
    return None


def _hf_config(path: str) -> Tuple[str, dict]:
    here = os.path.dirname(os.path.normpath(path))
    for p in (os.path.join(path, "config.json"), os.path.join(here, "huggingface", "config.json"),
              os.path.join(here, "config.json")):
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    return p, json.load(f)
            except (OSError, ValueError) as exc:
                raise PyrankIOError(f"{p}: not a readable HF config ({short(exc)})") from None
    raise PyrankIOError(f"{path}: a Megatron checkpoint needs the model's HF config.json (heads, key-value heads) "
                        "to name its tensors as HF does; put it in the checkpoint directory, in ../huggingface/ "
                        "(verl keeps it there) or in the parent directory")


class MegatronWeights(Mapping):
    """HF name → tensor of a megatron-core torch_dist checkpoint (see the module doc)."""

    def __init__(self, path: str):
        d = megatron_dir(path)
        if d is None:
            raise PyrankIOError(f"{path}: not a megatron-core torch_dist checkpoint (metadata.json + .metadata)")
        self.path = self.source = d
        self._dcp = DCPWeights(d)
        cfg_path, cfg = _hf_config(d)
        try:
            n = int(cfg["num_attention_heads"])
            g = int(cfg.get("num_key_value_heads") or n)
            hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n)
            self._vocab = int(cfg["vocab_size"]) if cfg.get("vocab_size") else None
        except (KeyError, TypeError, ValueError) as exc:
            raise PyrankIOError(f"{cfg_path}: lacks what naming a Megatron checkpoint needs ({short(exc)})") from None
        if n % g:
            raise PyrankIOError(f"{cfg_path}: {n} attention heads do not split into {g} key-value groups")
        self._heads, self._groups, self._head_dim = n, g, hd
        self._map: Dict[str, Tuple[str, Optional[int], Optional[str]]] = {}  # HF → (key, layer, cut)
        for key in self._dcp:
            if key in _GLOBAL:
                self._map[_GLOBAL[key]] = (key, None, "vocab" if key != "decoder.final_layernorm.weight" else None)
                continue
            rest = key[len(_LAYER):] if key.startswith(_LAYER) else None
            if rest is None or rest not in _PER_LAYER:
                raise PyrankIOError(f"{d}: tensor {key!r} is not mapped to HF names yet (dense Llama/Qwen-family "
                                    "decoders are; MoE, MLA and pipeline-local layer keys are not)")
            layers = self._dcp.shape_dtype(key)[0][0]
            for i in range(layers):
                for hf, cut in _PER_LAYER[rest]:
                    self._map[f"model.layers.{i}.{hf}"] = (key, i, cut)
        self.layout = (f"Megatron dist_ckpt (torch_dist; HF names from {cfg_path}: "
                       f"{n} heads, {g} key-value groups)")

    def _cut(self, t: torch.Tensor, cut: Optional[str], key: str) -> torch.Tensor:
        if cut is None:
            return t
        if cut == "vocab":
            return t[:self._vocab] if self._vocab is not None and t.shape[0] >= self._vocab else t
        if cut in ("gate", "up"):
            if t.shape[0] % 2:
                raise PyrankIOError(f"{self.path}: {key!r} has an odd number of rows; not a fused [gate; up]")
            half = t.shape[0] // 2
            return t[:half] if cut == "gate" else t[half:]
        n, g, hd = self._heads, self._groups, self._head_dim
        per = n // g + 2
        if t.shape[0] != g * per * hd:
            raise PyrankIOError(f"{self.path}: {key!r} has {t.shape[0]} rows, not the {g}·({n}/{g}+2)·{hd} "
                                "of the config's heads (gated attention, or another model's config?)")
        grouped = t.reshape(g, per, hd, *t.shape[1:])
        part = {"q": grouped[:, :per - 2], "k": grouped[:, per - 2], "v": grouped[:, per - 1]}[cut]
        return part.reshape(-1, *t.shape[1:])

    def __getitem__(self, name):
        if name not in self._map:
            raise KeyError(name)
        key, layer, cut = self._map[name]
        t = self._dcp[key] if layer is None else self._dcp.rows(key, layer, layer + 1)[0]
        return self._cut(t, cut, key).contiguous()

    def shape_dtype(self, name):
        key, layer, cut = self._map[name]
        shape, dtype = self._dcp.shape_dtype(key)
        if layer is not None:
            shape = shape[1:]
        meta = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[1]), device="meta")
        return tuple(self._cut(meta, cut, key).shape), dtype

    def file_of(self, name) -> str:
        return self._dcp.file_of(self._map[name][0])

    @property
    def _files(self):  # what `pyrank watch` checks for stability
        return self._dcp._files + [os.path.join(self.path, METADATA_JSON)]

    def __contains__(self, name):
        return name in self._map

    def __iter__(self):
        return iter(self._map)

    def __len__(self):
        return len(self._map)
