"""A small Llama-style decoder in plain PyTorch, with Hugging Face tensor names.

The names (``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,
down}_proj``, ``model.embed_tokens``, ``model.norm``, ``lm_head``) are Llama's, so pyrank's
default module selection applies to the demo's checkpoints exactly as it does to a real
model's. RMSNorm, rotary positions, SwiGLU, no biases.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DemoConfig:
    vocab_size: int = 16
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def to_hf(self) -> dict:
        """config.json in the transformers style (for people and tools reading the run dir)."""
        return dict(asdict(self), architectures=["PyrankDemoForCausalLM"], model_type="pyrank-demo",
                    torch_dtype="bfloat16", tie_word_embeddings=False)

    @classmethod
    def from_hf(cls, d: dict) -> "DemoConfig":
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        d = c.hidden_size
        self.h = c.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.h, d // self.h).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DemoLM(nn.Module):
    """Decoder-only LM: ``forward(ids)`` → logits (batch, time, vocab)."""

    def __init__(self, c: DemoConfig):
        super().__init__()
        self.config = c
        self.model = _Body(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        hd = c.hidden_size // c.num_attention_heads
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(c.max_position_embeddings, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02 if isinstance(m, nn.Linear) else 1.0 / math.sqrt(m.weight.shape[1]))

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.model.embed_tokens(ids)
        for blk in self.model.layers:
            x = blk(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def save_checkpoint(model: DemoLM, path: str, extra: dict | None = None) -> None:
    """``path/model.safetensors`` (bf16, rounded from the fp32 master weights, as trainers
    save them) and ``path/config.json``; written to a temporary sibling and renamed."""
    from safetensors.torch import save_file

    from ..io.writers import atomic_dir

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}

    def fill(d):
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f, indent=1)
        if extra:
            with open(os.path.join(d, "trainer_state.json"), "w") as f:
                json.dump(extra, f, indent=1)

    atomic_dir(path, fill)


def load_weights(model: DemoLM, weights) -> DemoLM:
    """Copy a mapping name → tensor (any dtype) into ``model`` (fp32); every parameter
    must be present."""
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name not in weights:
                raise KeyError(f"weights lack {name!r}")
            p.copy_(weights[name].to(p.dtype))
    return model
