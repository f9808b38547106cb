"""A model family as one record: what everything outside ``models/`` needs to know about it.

Checkpoint I/O, the engine, parallelism and the planner take a ``ModelSpec`` (found by the
``model_type`` of a config.json, aliases included), never a family's classes by name.  Parameter counts
come from the model built on the meta device; the planner's units, saved bytes and attention shape are
the family's (``models/common/costs.py``), pinned against its model by ``tests/test_architecture.py``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_train.models.common.costs import AttentionShape, Unit
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.key_map import Slot


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per family
class ModelSpec:
    name: str  # the family, e.g. "deepseek_v2"
    model_types: tuple[str, ...]  # config.json model_type values this family reads (the first is written)
    config_cls: type  # an HFConfig (models/common/config.py): from_hf_dict / to_hf_dict / from_name / NAMED_SIZES
    model_cls: type  # a CausalLM (models/common/decoder.py): model_cls(config, layout, attn_backend=...)
    ours_to_hf: Callable[[str, Any, ExpertLayout], list[tuple[str, Slot]]]  # the one key map: (name, config, layout)
    hub_ids: dict[str, str | None]  # named size -> its Hugging Face model id
    hub_sizes: dict[str, str]  # every Hugging Face model id of the family a recipe may name -> its named size
    chat_template: str  # the data template of the family's chat models
    attention_types: tuple[type, ...]  # modules with an ``inner_attention`` that sequence parallelism wraps
    moe_types: tuple[type, ...]  # modules with a ``balance_group`` for the balance loss under SP
    norm_types: tuple[type, ...]  # modules whose weights start at one (the rest: normal(0, initializer_range))
    layers: Callable[[nn.Module], nn.ModuleList]  # the decoder layers (activation checkpointing wraps each)
    # What the planner and the metrics need (models/common/costs.py; pinned against the model by tests):
    layer_units: Callable[[Any, ExpertLayout, int], list[Unit]]  # ZeRO-3 units of layer i, in forward order
    # (config, layer i, bytes per element, max_length, attention kernel) -> bytes per token layer i saves, by part
    layer_activations: Callable[[Any, int, int, int, str], dict[str, float]]
    attention: Callable[[Any], AttentionShape]  # what the attention kernels compute (FLOPs, SP degrees)
    # Called by the trainer after each optimiser step with the step's global expert load (moe layers, E)
    # and the recipe's bias_update_rate; returns figures to log (DeepSeek V3's aux-loss-free balancing).
    after_step: Callable[[nn.Module, torch.Tensor, float], dict[str, Any]] | None = None
    # HF keys of a source checkpoint that the model does not hold but an export copies through
    # unchanged (DeepSeek V3's multi-token-prediction layers); (config, key) -> bool.
    carried_key: Callable[[Any, str], bool] | None = None

    def build(self, cfg: Any, layout: ExpertLayout | None = None, attn_backend: str = "auto") -> nn.Module:
        return self.model_cls(cfg, layout or ExpertLayout(), attn_backend=attn_backend)

    def config(self, hf_dict: dict[str, Any]) -> Any:
        return self.config_cls.from_hf_dict(hf_dict)

    def named_config(self, size: str, **overrides: Any) -> Any:
        return self.config_cls.from_name(size, **overrides)

    def train_flops(self, cfg: Any, sample_lengths: list[int]) -> float:
        """Model FLOPs of a forward and backward (3 x forward) over packed samples of these lengths:
        6 x the matmul weights a token touches x tokens, plus causal attention over each sample
        (QK^T and PV: ``AttentionShape.flops_per_key`` x s^2 / 2 per sample of s tokens)."""
        keys = sum(s * s / 2 for s in sample_lengths)
        return 6 * param_counts(cfg).active_matmul * sum(sample_lengths) + 3 * self.attention(cfg).flops_per_key * keys


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    for model_type in spec.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        _REGISTRY[model_type] = spec
    return spec


def spec_for(model_type: str | None) -> ModelSpec:
    """The family that reads config.json files of ``model_type``."""
    if model_type not in _REGISTRY:
        raise ValueError(
            f"config.json has model_type={model_type!r}, which moe-train does not train; supported: "
            f"{', '.join(sorted(_REGISTRY))} (point --model at such a checkpoint directory)"
        )
    return _REGISTRY[model_type]


def spec_of(cfg_or_model: Any) -> ModelSpec:
    """The family of a config or model instance."""
    cfg = getattr(cfg_or_model, "config", cfg_or_model)
    for spec in _REGISTRY.values():
        if type(cfg) is spec.config_cls:  # exact: one family's config class may extend another's
            return spec
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered model family")


def families() -> list[ModelSpec]:
    return list(dict.fromkeys(_REGISTRY.values()))


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter
    active_matmul: int  # matmul weights one token touches: top-k routed experts; no embedding lookup, no norms


def param_counts(cfg: Any) -> ParamCounts:
    """Counted on the model built on the meta device (cached per configuration; the expert layout moves
    parameters around without changing their count, so the default one is built)."""
    return _param_counts(spec_of(cfg).name, json.dumps(cfg.schema_fields(), sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _param_counts(family: str, cfg_json: str) -> ParamCounts:
    spec = next(s for s in families() if s.name == family)
    cfg = spec.config_cls(**json.loads(cfg_json))
    with torch.device("meta"):
        model = spec.build(cfg)
    total = sum(p.numel() for p in model.parameters())
    not_matmul = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, (nn.Embedding, *spec.norm_types))
        for p in m.parameters(recurse=False)
    )
    routed = 0.0
    for module in model.modules():
        if isinstance(module, spec.moe_types):
            experts = sum(p.numel() for p in module.experts.parameters())
            routed += experts * (1 - cfg.experts_per_token / cfg.num_experts)
    return ParamCounts(total=total, active_matmul=int(round(total - not_matmul - routed)))
