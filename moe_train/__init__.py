"""moe-train: full fine-tuning of MoE models (DeepSeek V2/V3, Qwen3-MoE) with sharded experts under DeepSpeed ZeRO-3."""

# The model families: importing one registers its ModelSpec.  This is the only place outside a family's
# folder that names it; everything else finds it by config.json's model_type (moe_train.models.spec_for).
from moe_train.models.deepseek_v2 import CausalLMOutput, DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: I001
from moe_train.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from moe_train.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moe_train.checkpoint  # noqa: F401, E402  (gives every registered family's model from_pretrained / save_pretrained)

__all__ = [
    "CausalLMOutput",
    "DeepseekV2Config",
    "DeepseekV2ForCausalLM",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
]
