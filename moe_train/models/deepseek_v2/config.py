"""DeepSeek V2 configuration: every field of the official ``config.json``, and the named sizes.

The field names and defaults follow DeepSeek's remote-code ``config.json`` (``rope_scaling`` as a
yarn dict, ``topk_method``, ``n_group`` ...).  Reading, writing and checking the fields is
``models/common/config.py``'s; the expert layout is not part of the config (``ExpertLayout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moe_train.models.common.config import HFConfig
from moe_train.models.common.deepseek import DeepseekShapes


@dataclass
class DeepseekV2Config(DeepseekShapes, HFConfig):
    FAMILY: ClassVar[str] = "DeepSeek V2"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek_v2",)
    ARCHITECTURE: ClassVar[str] = "DeepseekV2ForCausalLM"
    TOPK_METHODS: ClassVar[tuple[str, ...]] = ("greedy", "group_limited_greedy")
    # Fields DeepSeek's code defines but we do not implement: refused rather than ignored.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "pretraining_tp": 1,
        "scoring_func": "softmax",
    }
    FIELD_MIN: ClassVar[dict[str, float]] = {
        **HFConfig.FIELD_MIN,
        "first_k_dense_replace": 0,
        "n_shared_experts": 0,
        "routed_scaling_factor": 0.0,
        "aux_loss_alpha": 0.0,
    }
    OPEN_MIN: ClassVar[frozenset[str]] = HFConfig.OPEN_MIN | {"routed_scaling_factor"}

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.topk_method not in self.TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r} is unknown; use one of {list(self.TOPK_METHODS)}")
        if self.n_routed_experts is None:
            return
        if self.topk_method == "group_limited_greedy":
            if not self.n_group or self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"group_limited_greedy needs n_group dividing n_routed_experts={self.n_routed_experts}, "
                    f"got n_group={self.n_group}"
                )
            if not self.topk_group or self.topk_group > self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts={self.n_routed_experts}"
            )


_YARN_40X = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

# The Hugging Face model of each named size (the chat variants share the base's shapes).
HUB_IDS: dict[str, str | None] = {
    "deepseek-v2": "deepseek-ai/DeepSeek-V2",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "tiny": None,
}
# Every Hugging Face model of the family a recipe may name, and its named size.
HUB_SIZES: dict[str, str] = {
    "deepseek-ai/DeepSeek-V2": "deepseek-v2",
    "deepseek-ai/DeepSeek-V2-Chat": "deepseek-v2",
    "deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite",
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite",
}

NAMED_SIZES: dict[str, dict[str, Any]] = {
    # deepseek-ai/DeepSeek-V2 and -V2-Chat (236B total, 21B active).
    "deepseek-v2": dict(
        vocab_size=102400,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=2,
        n_routed_experts=160,
        routed_scaling_factor=16.0,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="group_limited_greedy",
        n_group=8,
        topk_group=3,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        aux_loss_alpha=0.003,
        seq_aux=True,
        max_position_embeddings=163840,
        initializer_range=0.006,
        rope_scaling=dict(_YARN_40X),
    ),
    # deepseek-ai/DeepSeek-V2-Lite and -Lite-Chat (15.7B total, 2.4B active).
    "deepseek-v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        aux_loss_alpha=0.001,
        seq_aux=True,
        max_position_embeddings=163840,
        initializer_range=0.02,
        rope_scaling=dict(_YARN_40X),
    ),
    # The one debug size used by every test, the smoke run and the quick benchmarks.  Its
    # vocabulary is the tokenizer shipped in moe_train/assets/tiny_tokenizer.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=1.0,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=16,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        aux_loss_alpha=0.001,
        seq_aux=True,
        max_position_embeddings=2048,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        rope_scaling={
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
}
DeepseekV2Config.NAMED_SIZES = NAMED_SIZES
