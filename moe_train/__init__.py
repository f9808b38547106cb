"""moe-train: full fine-tuning of DeepSeek-family MoE models with sharded experts under DeepSpeed ZeRO-3."""

import moe_train.checkpoint  # noqa: F401  (gives every family's model from_pretrained / save_pretrained)
from moe_train.models.deepseek_v2 import CausalLMOutput, DeepseekV2Config, DeepseekV2ForCausalLM
from moe_train.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

__all__ = ["CausalLMOutput", "DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV3Config", "DeepseekV3ForCausalLM"]
