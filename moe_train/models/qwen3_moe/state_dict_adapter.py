"""The one key map between our Qwen3-MoE parameters and the official HF checkpoint keys.

Our names equal the HF names everywhere except the ``shard`` layout's stacked experts, which map to the
per-expert keys of the released checkpoints (``models/common/moe.py``: ``STACKED_EXPERT_KEYS``);
transformers 5 fuses those into its (E, 2F, D) / (E, D, F) parameters when it loads them.
"""

from __future__ import annotations

from moe_train.models.common.decoder import DECODER_KEYS
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.key_map import KeyMap, Slot, in_layers
from moe_train.models.common.mlp import DENSE_MLP_KEYS
from moe_train.models.common.moe import STACKED_EXPERT_KEYS
from moe_train.models.qwen3_moe.attention import GQA_KEYS
from moe_train.models.qwen3_moe.moe import QWEN3_MOE_KEYS

KEY_MAP = KeyMap(
    "Qwen3-MoE",
    same=[*DECODER_KEYS, *in_layers(GQA_KEYS + DENSE_MLP_KEYS + QWEN3_MOE_KEYS)],
    stacked=STACKED_EXPERT_KEYS,
)


def ours_to_hf(name: str, cfg, layout: ExpertLayout) -> list[tuple[str, Slot]]:
    """The HF tensors stored in our parameter ``name`` of a model with config ``cfg``, in checkpoint order."""
    return KEY_MAP.ours_to_hf(name, layout.shard_size(cfg.num_experts))
