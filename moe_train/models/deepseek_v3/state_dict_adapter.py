"""The one key map between our DeepSeek V3 parameters and the official HF checkpoint keys.

V2's map plus the router's ``e_score_correction_bias`` (a buffer: saved, loaded and exported like a
parameter).  FP8 checkpoints' ``weight_scale_inv`` tensors are consumed with their weights by the
checkpoint reader and never reach this map; MTP layers are carried, not mapped.
"""

from __future__ import annotations

from moe_train.models.common.key_map import KeyMap, Slot
from moe_train.models.deepseek_v2.state_dict_adapter import SAME, STACKED

KEY_MAP = KeyMap("DeepSeek V3", same=[*SAME, "model.layers.{}.mlp.gate.e_score_correction_bias"], stacked=STACKED)


def ours_to_hf(name: str, cfg) -> list[tuple[str, Slot]]:
    """The HF tensors stored in our parameter (or buffer) ``name``, in checkpoint order."""
    return KEY_MAP.ours_to_hf(name, cfg.shard_size)
