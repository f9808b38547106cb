"""Qwen3's attention: grouped-query attention with an RMSNorm on each q and k head before the rotary
embedding, and the rotary embedding as transformers applies it (the two halves of a head rotated
against each other, not adjacent pairs as in DeepSeek's).

Shapes: B batch, T tokens, H query heads, G key/value heads (G divides H), D head dim.
The kernel is the ``inner_attention`` submodule (``models/common/attention.py``), which takes the G
k/v heads as they are (no copy to H heads before sequence parallelism's exchange).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.models.common.attention import VarlenAttention
from moe_train.models.common.mlp import linear
from moe_train.models.common.norm import RMSNorm

# Our parameter names inside a decoder layer, equal to the HF keys (``models/common/key_map.py``).
GQA_KEYS = [
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.q_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.k_norm.weight",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
]


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape position_ids.shape + (head_dim/2,), fp32: transformers' default rotary."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x[i], x[i + D/2]) by each position's angle i, in fp32 (transformers rotates in the model
    dtype: equal in fp32); cos/sin (B, T, D/2)."""
    first, second = x_BTHD.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).type_as(x_BTHD)


class GQAttention(nn.Module):
    """q/k/v projections (H, G, G heads of D), RMSNorm per q and k head, rotary, causal varlen attention,
    o_proj.  Submodules registered in the order the forward runs them."""

    def __init__(self, cfg, attn_backend: str = "auto") -> None:
        super().__init__()
        D, H, G = cfg.attention_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        hidden, std, bias = cfg.hidden_size, cfg.initializer_range, cfg.attention_bias
        self.head_dim = D
        self.q_proj = linear(hidden, H * D, std, bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_proj = linear(hidden, G * D, std, bias)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.v_proj = linear(hidden, G * D, std, bias)
        self.inner_attention = VarlenAttention(D**-0.5, attn_backend)
        self.o_proj = linear(H * D, hidden, std, bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        cos, sin = rope
        q_BTHD = apply_rope(self.q_norm(self.q_proj(x_BTD).view(B, T, -1, self.head_dim)), cos, sin)
        k_BTGD = apply_rope(self.k_norm(self.k_proj(x_BTD).view(B, T, -1, self.head_dim)), cos, sin)
        v_BTGD = self.v_proj(x_BTD).view(B, T, -1, self.head_dim)
        out_BTHD = self.inner_attention(q_BTHD, k_BTGD, v_BTGD, cu_seqlens, max_seqlen)
        return self.o_proj(out_BTHD.reshape(B, T, -1))
