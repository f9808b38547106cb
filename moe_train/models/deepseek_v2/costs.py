"""DeepSeek V2 for the planner and the metrics (``models/common/costs.py``): ZeRO-3 units and saved bytes
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
from moe_train.models.deepseek_v2.config import DeepseekV2Config


def layer_units(cfg: DeepseekV2Config, layout: ExpertLayout, i: int) -> list[Unit]:
    D = cfg.hidden_size
    units = [Unit("input_layernorm", D), *mla_units(cfg), Unit("post_attention_layernorm", D)]
    if cfg.is_moe_layer(i):
        return units + moe_units(cfg, layout, router=cfg.n_routed_experts * D, shared=cfg.n_shared_experts or 0)
    return units + swiglu_units("mlp", D, cfg.intermediate_size)


def layer_activations(cfg: DeepseekV2Config, i: int, b: int, max_length: int, attention: str) -> dict[str, float]:
    """Bytes per token layer ``i`` saves (``models/common/costs.py`` lists the parts)."""
    if not cfg.is_moe_layer(i):
        mlp = dense_activations(cfg, b)
    else:  # group_limited_greedy also keeps each group's best score and the kept groups' indices
        groups = cfg.n_group * 4 + cfg.topk_group * 8 if cfg.topk_method == "group_limited_greedy" else 0
        mlp = moe_activations(cfg, b, router_extra=groups, shared=cfg.n_shared_experts or 0)
    return {**mla_activations(cfg, b, max_length, attention), **mlp}


def attention(cfg: DeepseekV2Config) -> AttentionShape:
    return mla_shape(cfg)
