"""The one key map between our DeepSeek V2 parameters and the official HF checkpoint keys.

Our names equal the HF names everywhere except the ``shard`` layout's stacked experts
(``models/common/moe.py``: ``STACKED_EXPERT_KEYS``).
"""

from __future__ import annotations

from moe_train.models.common.decoder import DECODER_KEYS
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.key_map import KeyMap, Slot, in_layers
from moe_train.models.common.mla import MLA_KEYS
from moe_train.models.common.mlp import DENSE_MLP_KEYS
from moe_train.models.common.moe import MOE_KEYS, STACKED_EXPERT_KEYS

KEY_MAP = KeyMap(
    "DeepSeek V2", same=[*DECODER_KEYS, *in_layers(MLA_KEYS + DENSE_MLP_KEYS + MOE_KEYS)], stacked=STACKED_EXPERT_KEYS
)


def ours_to_hf(name: str, cfg, layout: ExpertLayout) -> list[tuple[str, Slot]]:
    """The HF tensors stored in our parameter ``name`` of a model with config ``cfg``, in checkpoint order."""
    return KEY_MAP.ours_to_hf(name, layout.shard_size(cfg.num_experts))
