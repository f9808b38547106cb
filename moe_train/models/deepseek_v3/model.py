"""DeepSeek V3 decoder: V2's decoder (MLA, YaRN, shared + routed experts in the ``shard`` or ``origin``
layout) with V3's router in every MoE layer.  MTP layers are not part of the trained model: their
keys are carried from the source checkpoint to the export (``DeepseekV3Config.is_mtp_key``).

Loading and saving HF checkpoints is ``moe_train.checkpoint``; this module reads no files.
"""

from __future__ import annotations

from moe_train.models.deepseek_v2.model import DeepseekV2ForCausalLM
from moe_train.models.deepseek_v3.moe import NoAuxMoE


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """``forward`` as ``DeepseekV2ForCausalLM.forward``; ``config`` is a ``DeepseekV3Config``."""

    moe_cls = NoAuxMoE
    # DeepSpeed (like transformers) keeps buffers named here in fp32 under bf16 training; the router's own
    # ``_apply`` does the same for ``.to(dtype)``.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
