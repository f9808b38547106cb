"""Multi-head latent attention (MLA) with packed variable-length sequences: the attention of DeepSeek V2
and V3 (and Kimi K2, Moonlight), shared by their families.

Shapes: B batch, T tokens, H heads, N nope dim, R rope dim, V value dim, C kv_lora_rank.
``cu_seqlens`` (int32, n+1) holds the sample boundaries of a packed row (B == 1): tokens attend
causally inside their own sample only.  The attention kernel itself is the ``inner_attention``
submodule (``models/common/attention.py``), which sequence parallelism wraps.

A family using MLA mixes ``MLAShapes`` into its config, which then needs the fields ``hidden_size``,
``num_attention_heads``, ``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
``v_head_dim``, ``attention_bias``, ``initializer_range``, ``rope_theta`` and ``rope_scaling`` (YaRN).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.models.common.attention import VarlenAttention
from moe_train.models.common.mlp import linear
from moe_train.models.common.norm import RMSNorm
from moe_train.models.common.rope import apply_rope, rope_cos_sin, yarn_get_mscale

# Our parameter names inside a decoder layer, equal to the HF keys (``models/common/key_map.py``).
MLA_KEYS = [
    "self_attn.q_proj.weight",
    "self_attn.q_a_proj.weight",
    "self_attn.q_a_proj.bias",
    "self_attn.q_a_layernorm.weight",
    "self_attn.q_b_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_a_proj_with_mqa.bias",
    "self_attn.kv_a_layernorm.weight",
    "self_attn.kv_b_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
]


class MLAShapes:
    """Derived sizes of an MLA config (a mixin of the family's config dataclass)."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale


def mla_rope(cfg: MLAShapes, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) every layer's ``MLAttention`` takes, for (B, T) positions."""
    return rope_cos_sin(position_ids, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)


class MLAttention(nn.Module):
    def __init__(self, cfg: MLAShapes, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        H, D, std = cfg.num_attention_heads, cfg.hidden_size, cfg.initializer_range
        if cfg.q_lora_rank is None:
            self.q_proj = linear(D, H * cfg.qk_head_dim, std)
        else:
            self.q_a_proj = linear(D, cfg.q_lora_rank, std, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = linear(cfg.q_lora_rank, H * cfg.qk_head_dim, std)
        self.kv_a_proj_with_mqa = linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, std, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), std)
        self.o_proj = linear(H * cfg.v_head_dim, D, std, bias=cfg.attention_bias)
        self.inner_attention = VarlenAttention(cfg.softmax_scale, attn_backend)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """``rope``: the (cos, sin) of ``mla_rope``."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, N, R, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        cos, sin = rope
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_nope, q_rope = q.view(B, T, H, N + R).split([N, R], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([cfg.kv_lora_rank, R], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, H, N + V)
        k_nope, v = kv.split([N, V], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, T, 1, R), cos, sin)  # one rope key shared by all heads
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, T, H, R)], dim=-1)
        out = self.inner_attention(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(B, T, H * V))
