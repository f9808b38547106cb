"""DeepSeek V3 in plain single-device PyTorch: the shared decoder (``models/common/decoder.py``) with MLA
and YaRN (``models/common/mla.py``), dense SwiGLU layers first, then MoE blocks with V3's router.  MTP
layers are not part of the trained model: their keys are carried from the source checkpoint to the
export (``DeepseekV3Config.is_mtp_key``).

Loading and saving HF checkpoints is ``moe_train.checkpoint``; this module reads no files.
"""

from __future__ import annotations

import torch

from moe_train.models.common.decoder import CausalLM, DecoderLayer
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.mla import MLAttention, mla_rope
from moe_train.models.common.mlp import SwiGLUMLP
from moe_train.models.common.moe import MoE
from moe_train.models.deepseek_v3.config import DeepseekV3Config
from moe_train.models.deepseek_v3.moe import NoAuxRouter


class DeepseekV3ForCausalLM(CausalLM):
    """``forward`` as ``CausalLM.forward``; routed experts in the ``layout`` given (default: one shard)."""

    # DeepSpeed (like transformers) keeps buffers named here in fp32 under bf16 training; the router's own
    # ``_apply`` does the same for ``.to(dtype)``.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(
        self, config: DeepseekV3Config, layout: ExpertLayout | None = None, attn_backend: str = "auto"
    ) -> None:
        layout = layout or ExpertLayout()

        def layer(i: int) -> DecoderLayer:
            attention = MLAttention(config, attn_backend)
            if config.is_moe_layer(i):
                mlp = MoE(config, layout, NoAuxRouter(config))
            else:
                mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.initializer_range)
            return DecoderLayer(config.hidden_size, config.rms_norm_eps, attention, mlp, config.is_moe_layer(i))

        super().__init__(config, layout, layer)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_rope(self.config, position_ids)
