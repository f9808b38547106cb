"""DeepSeek V2 configuration: every field of the official ``config.json`` plus our expert layout.

The field names and defaults follow DeepSeek's remote-code ``config.json`` (``rope_scaling`` as a
yarn dict, ``topk_method``, ``n_group`` ...).  transformers 5 writes ``rope_parameters`` instead;
``from_hf_dict`` accepts both.  ``moe_implementation`` and ``expert_in_one_shard`` choose how the
experts are laid out in memory; they are not part of the checkpoint and never written to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moe_train.models.common.experts import MOE_IMPLEMENTATIONS

TOPK_METHODS = ("greedy", "group_limited_greedy")

# Keys of a source config.json that stop describing the weights once we write them: the dtype is
# the export's own, and exported weights are never quantised.
_REWRITTEN_HF_KEYS = {
    "torch_dtype",
    "dtype",
    "quantization_config",
    "transformers_version",
    "rope_parameters",
    "model_type",
}


@dataclass
class DeepseekV2Config:
    # What config.json may say, and the routing this family implements (a subclass family overrides them).
    FAMILY: ClassVar[str] = "DeepSeek V2"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek_v2",)
    TOPK_METHODS: ClassVar[tuple[str, ...]] = TOPK_METHODS
    SCORING_FUNCS: ClassVar[tuple[str, ...]] = ("softmax",)

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
    # Layout of the routed experts in memory (not saved to config.json).
    moe_implementation: str = field(default="shard", metadata={"layout": True})
    expert_in_one_shard: int | None = field(default=None, metadata={"layout": True})
    # Fields of the source config.json that we do not model (auto_map, architectures ...), written
    # back unchanged on export so DeepSeek's own remote code still loads the result.
    source_fields: dict[str, Any] = field(default_factory=dict, metadata={"layout": True}, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_shards(self) -> int:
        return self.n_routed_experts // self.shard_size

    @property
    def shard_size(self) -> int:
        """Experts per shard; ``None`` in the config means all routed experts in one shard."""
        return self.expert_in_one_shard or self.n_routed_experts

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError naming the first bad field and the fix: types and ranges first, then relations."""
        for f in dataclasses.fields(self):
            _check_field(f.name, str(f.type), getattr(self, f.name))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise ValueError(
                    f"config field {name}={value} is not below vocab_size={self.vocab_size}; "
                    "fix the token id or the vocabulary size"
                )
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation={self.moe_implementation!r} is unknown; use one of {list(MOE_IMPLEMENTATIONS)}"
            )
        if self.topk_method not in self.TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r} is unknown; use one of {list(self.TOPK_METHODS)}")
        if self.scoring_func not in self.SCORING_FUNCS:
            raise ValueError(
                f"scoring_func={self.scoring_func!r} is not supported; {self.FAMILY} uses "
                f"{' or '.join(map(repr, self.SCORING_FUNCS))}"
            )
        # Fields DeepSeek's code defines but we do not implement: refused rather than ignored.
        unsupported = {
            "hidden_act": (self.hidden_act, "silu"),
            "attention_dropout": (self.attention_dropout, 0.0),
            "tie_word_embeddings": (self.tie_word_embeddings, False),
            "pretraining_tp": (self.pretraining_tp, 1),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"{name}={value!r} is not supported by moe-train's {self.FAMILY}; set it to "
                    f"{supported!r} in config.json (every released {self.FAMILY} checkpoint does)"
                )
        if self.n_routed_experts is None:
            return
        if self.expert_in_one_shard is not None:
            e = self.n_routed_experts
            if self.expert_in_one_shard < 1 or e % self.expert_in_one_shard:
                divisors = [d for d in range(1, e + 1) if e % d == 0]
                raise ValueError(
                    f"expert_in_one_shard={self.expert_in_one_shard} does not divide n_routed_experts={e}; "
                    f"use one of {divisors}"
                )
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

    def replace(self, **changes: Any) -> "DeepseekV2Config":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **layout: Any) -> "DeepseekV2Config":
        """Build from a ``config.json`` dict: DeepSeek remote-code format or transformers 5 format."""
        if not isinstance(d, dict):
            raise ValueError(
                f"config.json holds a JSON {type(d).__name__}, not an object; use a DeepSeek V2 config.json"
            )
        model_type = d.get("model_type")
        if model_type not in cls.MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type={model_type!r}, not {' or '.join(map(repr, cls.MODEL_TYPES))}; "
                f"point --model at a {cls.FAMILY} checkpoint directory"
            )
        d = dict(d)
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise ValueError(f"config field rope_parameters={rope_parameters!r} must be a JSON object or null")
        if rope_parameters and not d.get("rope_scaling"):
            rp = dict(rope_parameters)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            rope_type = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rp}
        known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("layout")}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["source_fields"] = {k: v for k, v in d.items() if k not in known and k not in _REWRITTEN_HF_KEYS}
        for k in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(k), list) and kwargs[k]:  # generation configs list several; the first is ours
                kwargs[k] = kwargs[k][0]
        kwargs.update(layout)
        return cls(**kwargs)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The official DeepSeek V2 ``config.json`` content (loadable by transformers 5)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("layout")}
        if d["rope_scaling"]:
            rs = dict(d["rope_scaling"])
            rs.setdefault("type", rs.pop("rope_type", "yarn"))
            d["rope_scaling"] = rs
        return {
            "architectures": ["DeepseekV2ForCausalLM"],
            **self.source_fields,
            "model_type": "deepseek_v2",
            **d,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_json_file(cls, path: str, **layout: Any) -> "DeepseekV2Config":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), **layout)

    # ---------------------------------------------------------------- named sizes
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DeepseekV2Config":
        if name not in NAMED_SIZES:
            raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(NAMED_SIZES)}")
        return cls(**{**NAMED_SIZES[name], **overrides})


# Fields whose smallest value is not 1, and the largest sizes that are not a typo (a vocabulary of
# 2**22 is 8x the largest in use; anything bigger would allocate the embedding before failing).
_MIN = {
    "first_k_dense_replace": 0,
    "n_shared_experts": 0,
    "num_nextn_predict_layers": 0,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "routed_scaling_factor": 0.0,
    "aux_loss_alpha": 0.0,
    "initializer_range": 0.0,
    "attention_dropout": 0.0,
    "rms_norm_eps": 0.0,
    "rope_theta": 0.0,
}
_OPEN_MIN = {"routed_scaling_factor", "rms_norm_eps", "rope_theta"}  # must be above their minimum
_MAX = {"vocab_size": 2**22, "attention_dropout": 1.0, "rope_theta": 1e9, "max_position_embeddings": 2**24}
_DEFAULT_MAX = 2**20


def _check_field(name: str, annotation: str, value: Any) -> None:
    """One field's type and range; the message names the field and what to write instead."""
    kind = annotation.split(" | ")[0].split("[")[0]
    if value is None:
        if "None" not in annotation:
            raise ValueError(f"config field {name} is null; give it a value (or remove it for the default)")
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"config field {name}={value!r} must be true or false")
        return
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"config field {name}={value!r} must be a string")
        return
    if kind == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"config field {name}={value!r} must be a JSON object or null")
        factor = value.get("factor", 1)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor <= _DEFAULT_MAX:
            raise ValueError(f"config field {name}.factor={factor!r} must be a number >= 1")
        return
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            hint = f"write {int(value)}" if isinstance(value, float) and value.is_integer() else "write a whole number"
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                hint = f"write {value.strip()} without quotes"
            raise ValueError(f"config field {name}={value!r} must be an integer; {hint}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"config field {name}={value!r} must be a finite number")
    else:
        return
    low, high = _MIN.get(name, 1), _MAX.get(name, _DEFAULT_MAX)
    if value < low or (name in _OPEN_MIN and value == low) or value > high:
        above = f"above {low}" if name in _OPEN_MIN else f">= {low}"
        raise ValueError(f"config field {name}={value!r} is out of range; it must be {above} and <= {high}")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


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
        expert_in_one_shard=4,
    ),
}
