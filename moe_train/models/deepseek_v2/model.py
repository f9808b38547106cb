"""DeepSeek V2 in plain single-device PyTorch: the DeepSeek decoder of ``models/common/deepseek.py`` (MLA,
YaRN, dense SwiGLU layers first, then MoE blocks) with V2's router.

Loading and saving HF checkpoints is ``moe_train.checkpoint`` (which also provides
``DeepseekV2ForCausalLM.from_pretrained`` / ``save_pretrained``); this module reads no files.
"""

from __future__ import annotations

from moe_train.models.common.deepseek import DeepseekForCausalLM
from moe_train.models.deepseek_v2.moe import Router


class DeepseekV2ForCausalLM(DeepseekForCausalLM):
    """DeepSeek V2, ``DeepseekV2ForCausalLM(config, layout=None, attn_backend="auto")``: routed experts
    stored as shards (default) or one module per expert (``ExpertLayout``)."""

    router_cls = Router
