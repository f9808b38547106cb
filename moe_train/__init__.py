"""moe-train: DeepSeek V2 MoE full fine-tuning with sharded experts."""

from moe_train.models.deepseek_v2 import CausalLMOutput, DeepseekV2Config, DeepseekV2ForCausalLM

__all__ = ["CausalLMOutput", "DeepseekV2Config", "DeepseekV2ForCausalLM"]
