"""Qwen3-MoE in plain single-device PyTorch: the common decoder (``models/common/decoder.py``) with
Qwen3's GQA attention (per-head q/k norms) and, per ``Qwen3MoeConfig.is_moe_layer``, Qwen3's MoE block
or a dense SwiGLU MLP.

Loading and saving HF checkpoints is ``moe_train.checkpoint`` (which also provides
``Qwen3MoeForCausalLM.from_pretrained`` / ``save_pretrained``); this module reads no files.
"""

from __future__ import annotations

import torch

from moe_train.models.common.decoder import CausalLM, DecoderLayer
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.mlp import SwiGLUMLP
from moe_train.models.qwen3_moe.attention import GQAttention, rope_cos_sin
from moe_train.models.qwen3_moe.config import Qwen3MoeConfig
from moe_train.models.qwen3_moe.moe import RoutingStats, SparseMoeBlock, balance_loss


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE, ``Qwen3MoeForCausalLM(config, layout=None, attn_backend="auto")``: routed experts stored
    as shards (default) or one module per expert (``ExpertLayout``).  ``forward`` as ``CausalLM.forward``;
    its ``aux_loss`` is ``router_aux_loss_coef`` x transformers' load-balancing loss (training only)."""

    def __init__(self, config: Qwen3MoeConfig, layout: ExpertLayout | None = None, attn_backend: str = "auto") -> None:
        layout = layout or ExpertLayout()

        def layer(i: int) -> DecoderLayer:
            attention = GQAttention(config, attn_backend)
            if config.is_moe_layer(i):
                mlp = SparseMoeBlock(config, layout)
            else:
                mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.initializer_range)
            return DecoderLayer(config.hidden_size, config.rms_norm_eps, attention, mlp, config.is_moe_layer(i))

        super().__init__(config, layout, layer)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(position_ids, self.config.attention_head_dim, self.config.rope_theta)

    def aux_loss(self, per_layer: list[RoutingStats]) -> torch.Tensor | None:
        return balance_loss(per_layer, self.config.num_experts, self.config.router_aux_loss_coef)
