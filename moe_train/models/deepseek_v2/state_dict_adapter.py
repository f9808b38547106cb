"""The one key map between our DeepSeek V2 parameters and the official HF checkpoint keys.

Our names equal the HF names everywhere except the ``shard`` layout's stacked experts: the
experts of shard s of layer l live in ``model.layers.{l}.mlp.experts.{s}.gate_up_proj`` (S, 2F, D),
gate rows then up rows, and ``...down_proj`` (S, D, F).
"""

from __future__ import annotations

from moe_train.models.common.key_map import KeyMap, Slot

_LAYER = "model.layers.{}."
# Templates whose HF key equals our name, and our stacked expert parameters (DeepSeek V3 extends both).
SAME = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    *(
        _LAYER + n
        for n in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.q_a_proj.weight",
            "self_attn.q_a_proj.bias",
            "self_attn.q_a_layernorm.weight",
            "self_attn.q_b_proj.weight",
            "self_attn.kv_a_proj_with_mqa.weight",
            "self_attn.kv_a_proj_with_mqa.bias",
            "self_attn.kv_a_layernorm.weight",
            "self_attn.kv_b_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.o_proj.bias",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",  # dense layers
            "mlp.gate.weight",  # the router
            "mlp.shared_experts.gate_proj.weight",
            "mlp.shared_experts.up_proj.weight",
            "mlp.shared_experts.down_proj.weight",
            # `origin`: one module per expert
            "mlp.experts.{}.gate_proj.weight",
            "mlp.experts.{}.up_proj.weight",
            "mlp.experts.{}.down_proj.weight",
        )
    ),
]
STACKED = {
    _LAYER + "mlp.experts.{}.gate_up_proj": [
        (_LAYER + "mlp.experts.{}.gate_proj.weight", 0),
        (_LAYER + "mlp.experts.{}.up_proj.weight", 1),
    ],
    _LAYER + "mlp.experts.{}.down_proj": [(_LAYER + "mlp.experts.{}.down_proj.weight", None)],
}
KEY_MAP = KeyMap("DeepSeek V2", same=SAME, stacked=STACKED)


def ours_to_hf(name: str, cfg) -> list[tuple[str, Slot]]:
    """The HF tensors stored in our parameter ``name`` of a model with config ``cfg``, in checkpoint order."""
    return KEY_MAP.ours_to_hf(name, cfg.shard_size)
