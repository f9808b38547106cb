"""The one key map between our DeepSeek V3 parameters and the official HF checkpoint keys.

V2's keys (the shared decoder, MLA, dense MLP, the MoE block and its stacked experts) plus the router's
``e_score_correction_bias`` (a buffer: saved, loaded and exported like a parameter).  FP8 checkpoints'
``weight_scale_inv`` tensors are consumed with their weights by the checkpoint reader and never reach
this map; MTP layers are carried, not mapped.
"""

from __future__ import annotations

from moe_train.models.common.decoder import DECODER_KEYS
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.key_map import KeyMap, Slot, in_layers
from moe_train.models.common.mla import MLA_KEYS
from moe_train.models.common.mlp import DENSE_MLP_KEYS
from moe_train.models.common.moe import MOE_KEYS, STACKED_EXPERT_KEYS

KEY_MAP = KeyMap(
    "DeepSeek V3",
    same=[*DECODER_KEYS, *in_layers([*MLA_KEYS, *DENSE_MLP_KEYS, *MOE_KEYS, "mlp.gate.e_score_correction_bias"])],
    stacked=STACKED_EXPERT_KEYS,
)


def ours_to_hf(name: str, cfg, layout: ExpertLayout) -> list[tuple[str, Slot]]:
    """The HF tensors stored in our parameter (or buffer) ``name``, in checkpoint order."""
    return KEY_MAP.ours_to_hf(name, layout.shard_size(cfg.num_experts))
