"""Qwen3-MoE configuration (Qwen3-30B-A3B, Qwen3-235B-A22B): every field of the official ``config.json``.

Field names and defaults are transformers 5's ``Qwen3MoeConfig`` (i.e. Qwen3-30B-A3B's shapes) plus
``head_dim``, which the released config.json files carry (128: wider than hidden_size / heads).  A layer
is an MoE block unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``.
Reading, writing and checking the fields is ``models/common/config.py``'s; the expert layout is not part
of the config (``ExpertLayout``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from moe_train.models.common.config import HFConfig


@dataclass
class Qwen3MoeConfig(HFConfig):
    FAMILY: ClassVar[str] = "Qwen3-MoE"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_moe",)
    ARCHITECTURE: ClassVar[str] = "Qwen3MoeForCausalLM"
    # Fields Qwen3's code defines but we do not implement: refused rather than ignored.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "rope_scaling": None,  # plain rotary only (YaRN for 128k context is not implemented)
    }
    FIELD_MIN: ClassVar[dict[str, float]] = {**HFConfig.FIELD_MIN, "router_aux_loss_coef": 0.0}

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (transformers' fallback)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    attention_dropout: float = 0.0
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128  # routed experts per MoE layer (also the property code outside reads)
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]):
        """As ``HFConfig.from_hf_dict``; transformers 5 writes ``num_experts`` as ``num_local_experts`` (its
        attribute map), the released checkpoints as ``num_experts``: both are read, ``num_experts`` written."""
        if isinstance(d, dict) and "num_local_experts" in d:
            d = dict(d)
            local = d.pop("num_local_experts")
            d.setdefault("num_experts", local)
        return super().from_hf_dict(d)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """As ``HFConfig.to_hf_dict``, without ``head_dim`` when unset: transformers reads a null as a size."""
        d = super().to_hf_dict(torch_dtype)
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
        return d

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.mlp_only_layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers
            for i in self.mlp_only_layers
        ):
            raise ValueError(
                f"config field mlp_only_layers={self.mlp_only_layers!r} must be a list of layer indices in "
                f"0..{self.num_hidden_layers - 1}"
            )
        H, G = self.num_attention_heads, self.num_key_value_heads
        if H % G:
            raise ValueError(f"num_key_value_heads={G} must divide num_attention_heads={H}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )

    # ---------------------------------------------------------------- what code outside the family reads
    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def experts_per_token(self) -> int | None:
        return self.num_experts_per_tok

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


# The Hugging Face model of each named size (the instruct and thinking variants share the base's shapes).
HUB_IDS: dict[str, str | None] = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "tiny": None,
}
# Every Hugging Face model of the family a recipe may name, and its named size.
HUB_SIZES: dict[str, str] = {
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Base": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Thinking-2507": "qwen3-30b-a3b",
    "Qwen/Qwen3-235B-A22B": "qwen3-235b-a22b",
    "Qwen/Qwen3-235B-A22B-Instruct-2507": "qwen3-235b-a22b",
    "Qwen/Qwen3-235B-A22B-Thinking-2507": "qwen3-235b-a22b",
}

_QWEN3 = dict(
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=4,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    bos_token_id=151643,
    eos_token_id=151645,
)

NAMED_SIZES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B (30.5B total, 3.3B active).
    "qwen3-30b-a3b": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
    ),
    # Qwen/Qwen3-235B-A22B (235B total, 22B active).
    "qwen3-235b-a22b": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=94,
        num_attention_heads=64,
    ),
    # The debug size: GQA (2 q heads per k/v head), head_dim wider than hidden/heads as in the real sizes,
    # a dense layer among the MoE ones (mlp_only_layers), and the shipped tiny tokenizer's vocabulary.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        max_position_embeddings=2048,
        rope_theta=1000000.0,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    ),
}
Qwen3MoeConfig.NAMED_SIZES = NAMED_SIZES
