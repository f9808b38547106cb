"""DeepSeek V2 in plain single-device PyTorch: the shared decoder (``models/common/decoder.py``) with MLA
and YaRN (``models/common/mla.py``), dense SwiGLU layers first, then MoE blocks with V2's router.

Loading and saving HF checkpoints is ``moe_train.checkpoint`` (which also provides
``DeepseekV2ForCausalLM.from_pretrained`` / ``save_pretrained``); this module reads no files.
"""

from __future__ import annotations

import torch

from moe_train.models.common.decoder import CausalLM, DecoderLayer
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.mla import MLAttention, mla_rope
from moe_train.models.common.mlp import SwiGLUMLP
from moe_train.models.common.moe import MoE
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.moe import Router


class DeepseekV2ForCausalLM(CausalLM):
    """DeepSeek V2 with routed experts stored as shards (default) or one module per expert (``layout``);
    ``forward`` as ``CausalLM.forward``."""

    def __init__(
        self, config: DeepseekV2Config, layout: ExpertLayout | None = None, attn_backend: str = "auto"
    ) -> None:
        layout = layout or ExpertLayout()

        def layer(i: int) -> DecoderLayer:
            attention = MLAttention(config, attn_backend)
            if config.is_moe_layer(i):
                mlp = MoE(config, layout, Router(config))
            else:
                mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.initializer_range)
            return DecoderLayer(config.hidden_size, config.rms_norm_eps, attention, mlp, config.is_moe_layer(i))

        super().__init__(config, layout, layer)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_rope(self.config, position_ids)
