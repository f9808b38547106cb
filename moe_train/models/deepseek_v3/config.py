"""DeepSeek V3 configuration (V3, R1, V3.1, Kimi K2, Moonlight): every field of the official ``config.json``.

V3 keeps V2's shapes (MLA, shared + routed experts, YaRN) and changes the router: sigmoid scores,
``topk_method: noaux_tc`` with a per-expert ``e_score_correction_bias``, groups scored by the sum of
their two best biased scores.  The fields are V2's with V3's defaults (transformers' ``DeepseekV3Config``
defaults, i.e. DeepSeek-V3 671B), plus
``num_nextn_predict_layers`` (multi-token-prediction layers, stored after the decoder layers and
carried through an export untrained), ``quantization_config`` (the FP8 block format of the official
weights, read on load, never written: exports are bf16/fp32) and transformers' ``rope_interleave``.
Kimi K2 ships ``model_type: kimi_k2`` with remote code: that model type is kept on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moe_train.models.common.config import HFConfig
from moe_train.models.common.deepseek import DeepseekShapes

# The block-wise FP8 format of DeepSeek's and Moonshot's official weights.
FP8_BLOCK = (128, 128)


@dataclass
class DeepseekV3Config(DeepseekShapes, HFConfig):
    FAMILY: ClassVar[str] = "DeepSeek V3"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek_v3", "kimi_k2")
    ARCHITECTURE: ClassVar[str] = "DeepseekV3ForCausalLM"
    # Fields DeepSeek's code defines but we do not implement (or that V3 fixes): refused rather than ignored.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "pretraining_tp": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    }
    FIELD_MIN: ClassVar[dict[str, float]] = {
        **HFConfig.FIELD_MIN,
        "first_k_dense_replace": 0,
        "n_shared_experts": 0,
        "num_nextn_predict_layers": 0,
        "routed_scaling_factor": 0.0,
        "aux_loss_alpha": 0.0,
    }
    OPEN_MIN: ClassVar[frozenset[str]] = HFConfig.OPEN_MIN | {"routed_scaling_factor"}

    # transformers' DeepseekV3Config defaults (DeepSeek-V3 671B).
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    ep_size: int = 1
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 1
    quantization_config: dict[str, Any] | None = None
    rope_interleave: bool = True

    def validate(self) -> None:
        super().validate()
        if not self.rope_interleave:
            raise ValueError(
                "rope_interleave=false is not supported; every released DeepSeek V3 checkpoint uses "
                "interleaved rotary pairs (remove the field from config.json)"
            )
        if self.moe_layer_freq != 1:
            raise ValueError(
                f"moe_layer_freq={self.moe_layer_freq} is not supported by DeepSeek V3 (every layer from "
                "first_k_dense_replace on is MoE); set it to 1"
            )
        q = self.quantization_config
        if q is not None and (
            q.get("quant_method") != "fp8"
            or q.get("fmt", "e4m3") != "e4m3"
            or tuple(q.get("weight_block_size") or ()) != FP8_BLOCK
        ):
            raise ValueError(
                f"quantization_config={q} is not supported; moe-train reads DeepSeek's block FP8 "
                f"(quant_method fp8, fmt e4m3, weight_block_size {list(FP8_BLOCK)}) or unquantised "
                "weights; dequantise the checkpoint first"
            )
        if self.n_routed_experts is None:
            return
        E, G = self.n_routed_experts, self.n_group
        if not G or E % G or E // G < 2:
            raise ValueError(
                f"noaux_tc needs n_group dividing n_routed_experts={E} with at least 2 experts per "
                f"group (groups are scored by their two best experts), got n_group={G}"
            )
        if not self.topk_group or self.topk_group > G:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={G}")
        if not self.num_experts_per_tok or self.num_experts_per_tok > self.topk_group * (E // G):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.topk_group * (E // G)}, "
                f"the experts of the topk_group={self.topk_group} kept groups; raise topk_group"
            )

    def is_mtp_key(self, key: str) -> bool:
        """A multi-token-prediction layer's key: ``model.layers.{i}.*`` for i past the decoder layers."""
        if not key.startswith("model.layers."):
            return False
        index = key.split(".")[2]
        return index.isdigit() and self.num_hidden_layers <= int(index) < (
            self.num_hidden_layers + self.num_nextn_predict_layers
        )

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The official ``config.json`` content; exported weights are never quantised, so no quantization_config."""
        d = super().to_hf_dict(torch_dtype)
        d.pop("quantization_config")
        return d


_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}

HUB_IDS: dict[str, str | None] = {
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    "moonlight-16b-a3b": "moonshotai/Moonlight-16B-A3B-Instruct",
    "tiny-v3": None,
}
# Every Hugging Face model of the family a recipe may name, and its named size.
HUB_SIZES: dict[str, str] = {
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3-0324": "deepseek-v3",
    "deepseek-ai/DeepSeek-R1": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3.1": "deepseek-v3",
    "moonshotai/Kimi-K2-Instruct": "kimi-k2",
    "moonshotai/Moonlight-16B-A3B": "moonlight-16b-a3b",
    "moonshotai/Moonlight-16B-A3B-Instruct": "moonlight-16b-a3b",
}

NAMED_SIZES: dict[str, dict[str, Any]] = {
    # deepseek-ai/DeepSeek-V3 (also -V3-0324, -R1, -V3.1: same shapes; 671B total, 37B active):
    # the shapes are transformers' DeepseekV3Config defaults (a test pins them); context and YaRN
    # from https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json.
    "deepseek-v3": dict(
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        aux_loss_alpha=0.001,
        seq_aux=True,
        num_nextn_predict_layers=1,
        quantization_config=dict(_FP8),
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    # moonshotai/Kimi-K2-Instruct (1.04T total, 32B active), model_type kimi_k2:
    # https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json
    "kimi-k2": dict(
        vocab_size=163840,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=64,
        num_key_value_heads=64,
        n_shared_experts=1,
        n_routed_experts=384,
        routed_scaling_factor=2.827,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=8,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        aux_loss_alpha=0.001,
        seq_aux=True,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        bos_token_id=163584,
        eos_token_id=163585,
        num_nextn_predict_layers=0,
        quantization_config=dict(_FP8),
        source_model_type="kimi_k2",
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    # moonshotai/Moonlight-16B-A3B(-Instruct) (16B total, 3B active), bf16 weights:
    # https://huggingface.co/moonshotai/Moonlight-16B-A3B-Instruct/blob/main/config.json
    "moonlight-16b-a3b": dict(
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=2.446,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        aux_loss_alpha=0.001,
        seq_aux=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_scaling=None,
        bos_token_id=163584,
        eos_token_id=163586,
        num_nextn_predict_layers=0,
    ),
    # The debug size of the family (tests, the tiny_v3 smoke run); the vocabulary is the tokenizer in
    # moe_train/assets/tiny_tokenizer.  Two groups of four kept out of four, so group masking matters.
    "tiny-v3": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        aux_loss_alpha=0.001,
        seq_aux=True,
        max_position_embeddings=2048,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        num_nextn_predict_layers=0,
        rope_scaling={
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
}
DeepseekV3Config.NAMED_SIZES = NAMED_SIZES
