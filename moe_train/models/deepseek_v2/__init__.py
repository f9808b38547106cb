"""DeepSeek V2: config and named sizes, model, and the key map to the HF checkpoint layout."""

from moe_train.models.deepseek_v2.config import NAMED_SIZES, DeepseekV2Config
from moe_train.models.deepseek_v2.model import CausalLMOutput, DeepseekV2ForCausalLM

__all__ = ["NAMED_SIZES", "CausalLMOutput", "DeepseekV2Config", "DeepseekV2ForCausalLM"]
