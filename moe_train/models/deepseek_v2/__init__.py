"""DeepSeek V2 (V2, V2-Chat, V2-Lite): config and named sizes, model, key map, and its family spec."""

from moe_train.models.common import deepseek
from moe_train.models.common.decoder import CausalLMOutput
from moe_train.models.common.mla import MLAttention
from moe_train.models.common.moe import MoE
from moe_train.models.common.norm import RMSNorm
from moe_train.models.common.spec import ModelSpec, register
from moe_train.models.deepseek_v2.config import HUB_IDS, HUB_SIZES, NAMED_SIZES, DeepseekV2Config
from moe_train.models.deepseek_v2.model import DeepseekV2ForCausalLM
from moe_train.models.deepseek_v2.state_dict_adapter import ours_to_hf

SPEC = register(
    ModelSpec(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        config_cls=DeepseekV2Config,
        model_cls=DeepseekV2ForCausalLM,
        ours_to_hf=ours_to_hf,
        hub_ids=HUB_IDS,
        hub_sizes=HUB_SIZES,
        chat_template="deepseek_v2",
        attention_types=(MLAttention,),
        moe_types=(MoE,),
        norm_types=(RMSNorm,),
        layers=lambda model: model.model.layers,
        layer_units=deepseek.layer_units,
        layer_activations=deepseek.layer_activations,
        attention=deepseek.attention,
    )
)

__all__ = ["NAMED_SIZES", "SPEC", "CausalLMOutput", "DeepseekV2Config", "DeepseekV2ForCausalLM"]
