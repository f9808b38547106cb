"""DeepSeek V3 for the planner and the metrics (``models/common/costs.py``): ZeRO-3 units and saved bytes
of each decoder layer, and the attention's shape."""

from __future__ import annotations

from moe_train.models.common.costs import (
    AttentionShape,
    Unit,
    dense_activations,
    mla_activations,
    mla_shape,
    mla_units,
    moe_activations,
    moe_units,
    swiglu_units,
)
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.deepseek_v3.config import DeepseekV3Config


def layer_units(cfg: DeepseekV3Config, layout: ExpertLayout, i: int) -> list[Unit]:
    """The router's correction bias is a buffer (never gathered): the router unit is its weight alone."""
    D = cfg.hidden_size
    units = [Unit("input_layernorm", D), *mla_units(cfg), Unit("post_attention_layernorm", D)]
    if cfg.is_moe_layer(i):
        return units + moe_units(cfg, layout, router=cfg.n_routed_experts * D, shared=cfg.n_shared_experts or 0)
    return units + swiglu_units("mlp", D, cfg.intermediate_size)


def layer_activations(cfg: DeepseekV3Config, i: int, b: int, max_length: int, attention: str) -> dict[str, float]:
    """Bytes per token layer ``i`` saves (``models/common/costs.py`` lists the parts)."""
    if cfg.is_moe_layer(i):
        mlp = moe_activations(cfg, b, shared=cfg.n_shared_experts or 0)
    else:
        mlp = dense_activations(cfg, b)
    return {**mla_activations(cfg, b, max_length, attention), **mlp}


def attention(cfg: DeepseekV3Config) -> AttentionShape:
    return mla_shape(cfg)
