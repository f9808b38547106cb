"""DeepSeek V3 (V3, R1, V3.1, Kimi K2, Moonlight): config and named sizes, model, key map, family spec."""

from moe_train.models.common import deepseek
from moe_train.models.common.mla import MLAttention
from moe_train.models.common.moe import MoE
from moe_train.models.common.norm import RMSNorm
from moe_train.models.common.spec import ModelSpec, register
from moe_train.models.deepseek_v3.config import HUB_IDS, HUB_SIZES, NAMED_SIZES, DeepseekV3Config
from moe_train.models.deepseek_v3.model import DeepseekV3ForCausalLM
from moe_train.models.deepseek_v3.moe import update_correction_bias
from moe_train.models.deepseek_v3.state_dict_adapter import ours_to_hf

SPEC = register(
    ModelSpec(
        name="deepseek_v3",
        model_types=("deepseek_v3", "kimi_k2"),
        config_cls=DeepseekV3Config,
        model_cls=DeepseekV3ForCausalLM,
        ours_to_hf=ours_to_hf,
        hub_ids=HUB_IDS,
        hub_sizes=HUB_SIZES,
        chat_template="deepseek_v3",
        attention_types=(MLAttention,),
        moe_types=(MoE,),
        norm_types=(RMSNorm,),
        layers=lambda model: model.model.layers,
        layer_units=deepseek.layer_units,
        layer_activations=deepseek.layer_activations,
        attention=deepseek.attention,
        after_step=update_correction_bias,
        carried_key=lambda cfg, key: cfg.is_mtp_key(key),
    )
)

__all__ = ["NAMED_SIZES", "SPEC", "DeepseekV3Config", "DeepseekV3ForCausalLM"]
