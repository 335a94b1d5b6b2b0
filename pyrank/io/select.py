"""Which tensors are "modules": the 2-D attention and MLP projections of the repeated blocks.

Recognized by name, beyond Llama's: a module is a ``.weight`` whose name contains a block
index (``layers.3.``, ``h.3.``, ``blocks.3.``, ``layer.3.`` …) and whose last component
before ``.weight`` is a known projection name (q/k/v/o_proj, query/key/value, qkv_proj,
Wqkv, c_attn, c_proj, out_proj, dense, gate/up/down_proj, fc1/fc2, w1/w2/w3, c_fc,
dense_h_to_4h, dense_4h_to_h, …). Embeddings, heads and norms never match. ``include``
and ``exclude`` regexes (``re.search``) override: include adds, exclude removes.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence

_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block|decoder_layers|transformer_blocks)\.(\d+)\.")
_PROJ = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|query|key|value|query_key_value|wqkv|Wqkv|c_attn|c_proj|"
    r"out_proj|dense|gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|fc_in|fc_out|w1|w2|w3|c_fc|"
    r"dense_h_to_4h|dense_4h_to_h|wo|wi|wi_0|wi_1|attn_out|ff_proj|ff_out)\.weight$")
_NEVER = re.compile(r"(embed|lm_head|norm|ln_|layernorm|wte|wpe|rotary|\.bias$)", re.IGNORECASE)


def is_default_module(name: str) -> bool:
    return bool(_BLOCK.search(name) and _PROJ.search(name) and not _NEVER.search(name))


def layer_index(name: str) -> int:
    """The block index in a tensor name (``model.layers.3.…`` → 3); -1 outside the blocks."""
    mt = _BLOCK.search(name)
    return int(mt.group(3)) if mt else -1


def select_modules(names: Iterable[str], include: Optional[Sequence[str]] = None,
                   exclude: Optional[Sequence[str]] = None, shapes=None) -> List[str]:
    """The module names among ``names`` (in their order). ``shapes`` (name → shape), when
    given, restricts the result to 2-D tensors."""
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    out = []
    for n in names:
        chosen = is_default_module(n) or any(p.search(n) for p in inc)
        if chosen and not any(p.search(n) for p in exc):
            if shapes is None or len(shapes(n)) == 2:
                out.append(n)
    return out
