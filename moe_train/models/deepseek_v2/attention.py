"""Multi-head latent attention (MLA) with packed variable-length sequences.

Shapes: B batch, T tokens, H heads, N nope dim, R rope dim, V value dim, C kv_lora_rank.
``cu_seqlens`` (int32, n+1) holds the sample boundaries of a packed row (B == 1): tokens attend
causally inside their own sample only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.rope import apply_rope

try:  # flash-attn is an optional GPU dependency (extra "gpu").
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None

ATTENTION_BACKENDS = ("auto", "flash", "sdpa")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _linear(cfg: DeepseekV2Config, d_in: int, d_out: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, std=cfg.initializer_range)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; use one of {list(ATTENTION_BACKENDS)}")
    if backend == "flash" and flash_attn_varlen_func is None:
        raise ValueError("attention backend 'flash' needs flash-attn; install the 'gpu' extra or use 'sdpa'")
    if backend == "auto":
        return "flash" if flash_attn_varlen_func is not None and device.type == "cuda" else "sdpa"
    return backend


def varlen_attention(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHV: torch.Tensor,
    cu_seqlens: torch.Tensor | None, max_seqlen: int | None, scale: float, backend: str,
) -> torch.Tensor:
    """Causal attention restricted to each packed sample; returns (B, T, H, V)."""
    B, T, H, D = q_BTHD.shape
    V = v_BTHV.shape[-1]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q_BTHD.device)
        max_seqlen = T
    elif B != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but the batch has {B} rows; pack into shape (1, T)")
    # Both kernels want equal q/k/v head dims (MLA has V < D): pad v, drop the padding after.
    v_pad = F.pad(v_BTHV, (0, D - V)) if V < D else v_BTHV
    if resolve_backend(backend, q_BTHD.device) == "flash":
        out = flash_attn_varlen_func(
            q_BTHD.reshape(B * T, H, D), k_BTHD.reshape(B * T, H, D), v_pad.reshape(B * T, H, D),
            cu_seqlens, cu_seqlens, max_seqlen or T, max_seqlen or T, softmax_scale=scale, causal=True,
        )
        return out[..., :V].reshape(B, T, H, V)
    # Exact fallback: causal SDPA on each sample (no T x T mask across samples is ever built);
    # 4-D inputs with equal head dims let SDPA pick its flash kernel on CPU instead of the math path.
    q, k, v = (t.reshape(B * T, H, D).transpose(0, 1)[None] for t in (q_BTHD, k_BTHD, v_pad))  # (1, H, B*T, D)
    bounds = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=2)[0, ..., :V].transpose(0, 1).reshape(B, T, H, V)


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend
        H, D = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = _linear(cfg, D, H * cfg.qk_head_dim)
        else:
            self.q_a_proj = _linear(cfg, D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = _linear(cfg, cfg.q_lora_rank, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(cfg, D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = _linear(cfg, cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = _linear(cfg, H * cfg.v_head_dim, D, bias=cfg.attention_bias)

    def forward(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, N, R, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
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
        out = self.attn_forward(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(B, T, H * V))

    def attn_forward(self, q, k, v, cu_seqlens, max_seqlen):
        # The one place sequence parallelism wraps (head/sequence all-to-all around it).
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.cfg.softmax_scale, self.attn_backend)
