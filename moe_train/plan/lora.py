"""LoRA (``--lora-rank R``) in the planner: what a frozen base and rank-R adapters change against full
fine-tuning (``memory.py``, ``speed.py``).

The adapters are counted on the model built on the meta device with ``apply_lora`` (as the trainer
builds it), by the module that holds them: an adapter lives in the module of its base weight
(``LoraLinear``, ``LoraExpertShard``), so ZeRO-3 gathers it with that weight and the planner's unit
of that name grows by the adapter's numel and tensors.  What changes:

- model states: the base keeps only its bf16 (compute dtype) partition; the adapters have a
  partition, a gradient partition, an fp32 master and Adam's m and v, as a full model would;
- gradients: only the adapters' are reduce-scattered and stepped; the LM head computes no weight
  gradient;
- compute: a frozen GEMM's backward computes the input gradient only (one GEMM, not two: 2/3 of a
  full step's FLOPs for it), the adapters' GEMMs run forward and both backward GEMMs;
- activations: each adapter keeps its rank-R intermediate (x A^T) for B's gradient, per token of a
  dense or attention projection and per routed row of an expert projection.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

from moe_train.models import families, spec_of
from moe_train.models.common.costs import Unit
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.lora import LoraConfig, LoraExpertShard, LoraLinear, apply_lora, is_adapter


@dataclass(frozen=True)
class AdapterUnit:
    """The adapters one module holds: their numel, the numel of each tensor (ZeRO-3 keeps a tensor under
    the persistence threshold whole on every rank), whether the module is a routed-expert shard, and the
    elements its forward keeps for backward per token of the rank."""

    numel: int
    sizes: tuple[int, ...]
    routed: bool
    saved_per_token: float

    @property
    def tensors(self) -> int:
        return len(self.sizes)


@dataclass(frozen=True)
class Adapters:
    """The adapters of a model by layer, each a dict keyed by the planner's unit names (module paths)."""

    layers: tuple[dict[str, AdapterUnit], ...]

    @property
    def numel(self) -> int:
        return sum(a.numel for layer in self.layers for a in layer.values())

    def persistent_numel(self, threshold: int) -> int:
        return sum(n for layer in self.layers for a in layer.values() for n in a.sizes if n < threshold)

    def active_numel(self, cfg: Any) -> float:
        """Adapter numel one token multiplies: an expert shard's adapters for K of the E experts."""
        share = cfg.experts_per_token / cfg.num_experts
        return sum(a.numel * (share if a.routed else 1) for layer in self.layers for a in layer.values())

    def saved_per_token(self, i: int) -> float:
        """Elements the adapters of layer ``i`` keep for backward per token of the rank."""
        return sum(a.saved_per_token for a in self.layers[i].values())


def adapters(cfg: Any, layout: ExpertLayout, lora: LoraConfig) -> Adapters:
    """The adapters ``apply_lora`` adds to the model, counted on the meta device (cached per configuration)."""
    return _adapters(spec_of(cfg).name, json.dumps(cfg.schema_fields(), sort_keys=True, default=str), layout, lora)


@functools.lru_cache(maxsize=64)
def _adapters(family: str, cfg_json: str, layout: ExpertLayout, lora: LoraConfig) -> Adapters:
    spec = next(s for s in families() if s.name == family)
    cfg = spec.config_cls(**json.loads(cfg_json))
    # A layer's modules depend on its index only through its kind (dense, MoE, ...): build the layers up
    # to the first of each kind (a 236B model whole takes ~20 s on the meta device, its first two ~0.3 s).
    units = [spec.layer_units(cfg, layout, i) for i in range(cfg.num_hidden_layers)]
    first = {}
    for i, u in enumerate(units):
        first.setdefault(tuple(u), i)
    short = cfg.replace(num_hidden_layers=max(first.values()) + 1)
    with torch.device("meta"):
        model = apply_lora(spec.build(short, layout), lora)
    R, K, E = lora.rank, cfg.experts_per_token, cfg.num_experts
    built = []
    for layer in spec.layers(model):
        found = {}
        for name, m in layer.named_modules():
            sizes = tuple(p.numel() for n, p in m.named_parameters(recurse=False) if is_adapter(n))
            if not sizes:
                continue
            if isinstance(m, LoraExpertShard):  # x A^T of both projections for each of its T * K * S / E rows
                saved = 2 * R * K * layout.shard_size(E) / E
            elif isinstance(m, LoraLinear):  # x A^T for each token
                saved = R
            else:
                raise AssertionError(f"{name}: adapters on an unknown module {type(m).__name__}")
            found[name] = AdapterUnit(sum(sizes), sizes, isinstance(m, LoraExpertShard), saved)
        built.append(found)
    counted = sum(a.numel for layer in built for a in layer.values())
    if counted != sum(p.numel() for n, p in model.named_parameters() if is_adapter(n)):
        raise AssertionError("adapters outside the decoder layers: the planner counts them per layer")
    return Adapters(tuple(built[first[tuple(u)]] for u in units))


def with_adapters(units: list[Unit], layer: dict[str, AdapterUnit]) -> list[Unit]:
    """A layer's units with each module's adapters added (gathered, hooked and released with its base)."""
    return [
        Unit(u.name, u.numel + layer[u.name].numel, u.tensors + layer[u.name].tensors, u.expert, u.attention_kernel)
        if u.name in layer
        else u
        for u in units
    ]


def by_traced_name(cfg: Any, layout: ExpertLayout, lora: LoraConfig) -> dict[str, AdapterUnit]:
    """The adapters keyed by the names ``memory.step_trace`` gives units: ``{layer}.{unit}``."""
    ad = adapters(cfg, layout, lora)
    return {f"{i}.{name}": a for i, layer in enumerate(ad.layers) for name, a in layer.items()}
