"""Qwen3-MoE's costs for the planner and the metrics (``models/common/costs.py``): ZeRO-3 units, bytes
saved for backward, the attention shape.  Pinned against the model by ``tests/test_architecture.py``.

Shapes: D hidden, H query heads, G key/value heads, d head dim, E routed experts, b bytes per element,
S max_length.
"""

from __future__ import annotations

from moe_train.models.common.costs import (
    AttentionShape,
    Unit,
    dense_activations,
    linear_unit,
    moe_activations,
    moe_units,
    norm_bytes,
    swiglu_units,
)
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.qwen3_moe.config import Qwen3MoeConfig


def gqa_units(cfg: Qwen3MoeConfig) -> list[Unit]:
    """``GQAttention``; the kernel runs between ``v_proj`` and ``o_proj``."""
    D, H, G, d, bias = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.attention_head_dim,
        cfg.attention_bias,
    )
    return [
        linear_unit("self_attn.q_proj", D, H * d, bias),
        Unit("self_attn.q_norm", d),
        linear_unit("self_attn.k_proj", D, G * d, bias),
        Unit("self_attn.k_norm", d),
        linear_unit("self_attn.v_proj", D, G * d, bias, attention_kernel=True),
        linear_unit("self_attn.o_proj", H * d, D, bias),
    ]


def layer_units(cfg: Qwen3MoeConfig, layout: ExpertLayout, i: int) -> list[Unit]:
    """The router unit is its weight (E, D); no shared experts."""
    D = cfg.hidden_size
    units = [Unit("input_layernorm", D), *gqa_units(cfg), Unit("post_attention_layernorm", D)]
    if cfg.is_moe_layer(i):
        return units + moe_units(cfg, layout, router=cfg.num_experts * D)
    return units + swiglu_units("mlp", D, cfg.intermediate_size)


def gqa_activations(cfg: Qwen3MoeConfig, b: int, max_length: int, attention: str) -> dict[str, float]:
    """The input norm and its output (the q/k/v projections' input); the per-head q and k norms (the
    rotary keeps only cos/sin, shared by the layers); the o_proj input H*d.  The kernel: flash-attn
    keeps q, the G k/v heads, its output and the fp32 logsumexp; the per-sample SDPA path repeats k/v
    to H heads first (``models/common/attention.py``); eager keeps q, k, v and HF's fp32 softmax and
    its cast (``attention_scores``).  ``attention_grad_transients``: the kernel's dq, dk, dv and, for
    eager, the fp32 S x S softmax gradients.  The SDPA case is pinned against autograd's saved tensors
    (``tests/test_qwen3_moe.py``); flash's is not measured (no GPU in the tests)."""
    D, H, G, d, S = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.attention_head_dim,
        max_length,
    )
    attn = norm_bytes(D, b) + D * b
    attn += H * norm_bytes(d, b) + G * norm_bytes(d, b)
    attn += H * d * b
    kv = G if attention == "flash" else H
    scores = scores_grad = 0.0
    if attention in ("flash", "sdpa"):
        attn += (2 * H + 2 * kv) * d * b + H * 4
    else:
        attn += (H + 2 * kv) * d * b
        scores, scores_grad = H * S * (4 + (b if b < 4 else 0)), H * S * 8
    return {
        "attention": attn,
        "attention_scores": scores,
        "attention_grad_transients": scores_grad + (H + 2 * kv) * d * b,
    }


def layer_activations(cfg: Qwen3MoeConfig, i: int, b: int, max_length: int, attention: str) -> dict[str, float]:
    """Bytes per token layer ``i`` saves (``models/common/costs.py`` lists the parts)."""
    mlp = moe_activations(cfg, b) if cfg.is_moe_layer(i) else dense_activations(cfg, b)
    return {**gqa_activations(cfg, b, max_length, attention), **mlp}


def attention(cfg: Qwen3MoeConfig) -> AttentionShape:
    d = cfg.attention_head_dim
    return AttentionShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, d, d, d * 4)
