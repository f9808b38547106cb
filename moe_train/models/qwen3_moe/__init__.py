"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B and their instruct / thinking variants): config and named
sizes, model, key map, planner costs, and its family spec."""

from moe_train.models.common.norm import RMSNorm
from moe_train.models.common.spec import ModelSpec, register
from moe_train.models.qwen3_moe import costs
from moe_train.models.qwen3_moe.attention import GQAttention
from moe_train.models.qwen3_moe.config import HUB_IDS, HUB_SIZES, NAMED_SIZES, Qwen3MoeConfig
from moe_train.models.qwen3_moe.model import Qwen3MoeForCausalLM
from moe_train.models.qwen3_moe.moe import SparseMoeBlock
from moe_train.models.qwen3_moe.state_dict_adapter import ours_to_hf

SPEC = register(
    ModelSpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        config_cls=Qwen3MoeConfig,
        model_cls=Qwen3MoeForCausalLM,
        ours_to_hf=ours_to_hf,
        hub_ids=HUB_IDS,
        hub_sizes=HUB_SIZES,
        chat_template="qwen3",
        attention_types=(GQAttention,),
        moe_types=(SparseMoeBlock,),
        norm_types=(RMSNorm,),
        layers=lambda model: model.model.layers,
        layer_units=costs.layer_units,
        layer_activations=costs.layer_activations,
        attention=costs.attention,
    )
)

__all__ = ["NAMED_SIZES", "SPEC", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"]
