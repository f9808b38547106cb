"""DeepSeek V3 in plain single-device PyTorch: the DeepSeek decoder of ``models/common/deepseek.py`` (MLA,
YaRN, dense SwiGLU layers first, then MoE blocks) with V3's router.  MTP layers are not part of the
trained model: their keys are carried from the source checkpoint to the export
(``DeepseekV3Config.is_mtp_key``).

Loading and saving HF checkpoints is ``moe_train.checkpoint``; this module reads no files.
"""

from __future__ import annotations

from moe_train.models.common.deepseek import DeepseekForCausalLM
from moe_train.models.deepseek_v3.moe import NoAuxRouter


class DeepseekV3ForCausalLM(DeepseekForCausalLM):
    """DeepSeek V3, ``DeepseekV3ForCausalLM(config, layout=None, attn_backend="auto")``."""

    router_cls = NoAuxRouter
    # DeepSpeed (like transformers) keeps buffers named here in fp32 under bf16 training; the router's own
    # ``_apply`` does the same for ``.to(dtype)``.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
