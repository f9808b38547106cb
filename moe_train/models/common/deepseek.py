"""The DeepSeek architecture the V2 and V3 families share (and with them Kimi K2 and Moonlight): MLA with
YaRN, dense SwiGLU layers up to ``first_k_dense_replace``, then MoE blocks of routed and shared experts.
A family brings its config (with ``DeepseekShapes`` mixed in) and its router; its planner costs are the
ones here.

Shapes: B batch, T tokens, D hidden, E routed experts.
"""

from __future__ import annotations

import torch

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
from moe_train.models.common.decoder import CausalLM, DecoderLayer
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.mla import MLAShapes, MLAttention, mla_rope
from moe_train.models.common.mlp import SwiGLUMLP
from moe_train.models.common.moe import MoE


class DeepseekShapes(MLAShapes):
    """The DeepSeek config fields mapped onto what code outside the family reads (``HFConfig``)."""

    @property
    def num_experts(self) -> int | None:
        return self.n_routed_experts

    @property
    def experts_per_token(self) -> int | None:
        return self.num_experts_per_tok

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekForCausalLM(CausalLM):
    """A DeepSeek decoder with the family's ``router_cls`` (``x_TD -> (scores_TE, weight_TK, index_TK)``) in
    every MoE block; routed experts in ``layout`` (default: one shard per layer).  ``forward`` as
    ``CausalLM.forward``."""

    router_cls: type

    def __init__(self, config: DeepseekShapes, layout: ExpertLayout | None = None, attn_backend: str = "auto") -> None:
        layout = layout or ExpertLayout()

        def layer(i: int) -> DecoderLayer:
            attention = MLAttention(config, attn_backend)
            if config.is_moe_layer(i):
                mlp = MoE(config, layout, self.router_cls(config))
            else:
                mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.initializer_range)
            return DecoderLayer(config.hidden_size, config.rms_norm_eps, attention, mlp, config.is_moe_layer(i))

        super().__init__(config, layout, layer)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_rope(self.config, position_ids)


# ---------------------------------------------------------------------------- for the planner and the metrics
def layer_units(cfg: DeepseekShapes, layout: ExpertLayout, i: int) -> list[Unit]:
    """The router unit is its weight (E, D); V3's correction bias is a buffer, never gathered."""
    D = cfg.hidden_size
    units = [Unit("input_layernorm", D), *mla_units(cfg), Unit("post_attention_layernorm", D)]
    if cfg.is_moe_layer(i):
        return units + moe_units(cfg, layout, router=cfg.n_routed_experts * D, shared=cfg.n_shared_experts or 0)
    return units + swiglu_units("mlp", D, cfg.intermediate_size)


def layer_activations(cfg: DeepseekShapes, i: int, b: int, max_length: int, attention: str) -> dict[str, float]:
    """Bytes per token layer ``i`` saves (``models/common/costs.py`` lists the parts)."""
    if not cfg.is_moe_layer(i):
        mlp = dense_activations(cfg, b)
    else:  # group_limited_greedy also keeps each group's best score and the kept groups' indices
        groups = cfg.n_group * 4 + cfg.topk_group * 8 if cfg.topk_method == "group_limited_greedy" else 0
        mlp = moe_activations(cfg, b, router_extra=groups, shared=cfg.n_shared_experts or 0)
    return {**mla_activations(cfg, b, max_length, attention), **mlp}


def attention(cfg: DeepseekShapes) -> AttentionShape:
    return mla_shape(cfg)
