"""LoRA adapters on a built model: the base frozen, only low-rank A and B trainable.

Shapes: R rank, I in features, O out features, A rows (token-expert assignments sorted by expert),
S experts per shard, D hidden, F expert intermediate size.

``apply_lora(model, lora)`` replaces, in place, each targeted ``nn.Linear`` by a ``LoraLinear`` and each
``ExpertShard`` of the routed experts by a ``LoraExpertShard``; both keep the base's parameter objects
under the base's names (so the HF key map, the loader and ZeRO-3's partitions of the base are
unchanged) and add the adapters next to them:

- ``LoraLinear``: ``lora_A`` (R, I), ``lora_B`` (O, R); y = x W^T + scaling * (dropout(x) A^T) B^T.
- ``LoraExpertShard``: per expert, gate and up share one A, as PEFT's layout of the fused parameter
  implies: ``gate_up_lora_A`` (S, R, D), ``gate_up_lora_B`` (S, 2F, R); ``down_lora_A`` (S, R, F),
  ``down_lora_B`` (S, D, R).  The update runs as two more grouped GEMMs on each expert's sorted rows
  (A then B, rank R in between): no (S, O, I) delta is ever built, and every shard with its adapters
  runs on every forward, as the base shard does (ZeRO-3 ranks join the same gathers whatever the routing).

The router, norms, embeddings and LM head stay frozen.  Dropout applies to attention, dense and
shared-expert adapters only: it cannot be factored out of the routed experts' fused update (PEFT refuses
it there too).

QLoRA seam: the frozen base enters through ``base_linear`` and ``base_grouped`` only; a 4-bit base would
replace these two (dequantising per call) and its storage dtype, nothing else here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.models.common.experts import ExpertShard, _GroupedLinear, _SwiGLU
from moe_train.models.common.key_map import Slot

LORA_TARGETS = ("attention", "dense", "shared_experts", "experts")


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha (the update is scaled by alpha / rank, as PEFT without rsLoRA), dropout and the targets."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if self.rank < 1 or unknown or not self.targets:
            raise ValueError(
                f"LoRA rank {self.rank} with targets {list(self.targets)}: use a rank >= 1 and targets among "
                f"{list(LORA_TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The frozen base of a linear layer (a QLoRA base would dequantise here)."""
    return F.linear(x, weight, bias)


def base_grouped(x_AI: torch.Tensor, w_SOI: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    """The frozen base of an expert shard's grouped GEMM (a QLoRA base would dequantise here)."""
    return _GroupedLinear.apply(x_AI, w_SOI, counts_S)


def _init_A(a: torch.Tensor, fan_in: int) -> None:
    """PEFT's default A: kaiming-uniform with a = sqrt(5), i.e. uniform(+-1/sqrt(fan_in)); B starts at zero."""
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(a, -bound, bound)


class LoraLinear(nn.Module):
    """A frozen linear layer (the base's ``weight``/``bias`` objects) plus ``lora_B @ lora_A``."""

    def __init__(self, base: nn.Linear, lora: LoraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = lora.scaling
        self.lora_A = nn.Parameter(torch.empty(lora.rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora.rank))
        _init_A(self.lora_A, self.in_features)
        self.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return base_linear(x, self.weight, self.bias) + update * self.scaling

    def merged_weight(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """W + scaling * B A, in fp32, returned in W's dtype (full tensors, e.g. gathered)."""
        return (weight.float() + (b.float() @ a.float()) * self.scaling).to(weight.dtype)


class LoraExpertShard(nn.Module):
    """A frozen ``ExpertShard`` (its ``gate_up_proj``/``down_proj`` objects) plus per-expert adapters.

    ``gate_up_A`` (S, R, D) and ``down_A`` (S, R, F) are the shard's rows of its layer's initial As (drawn for
    all E experts at once, so an expert starts the same whatever the shard size or EP degree).  ``place``, if
    given, is called on the new adapters before this ``__init__`` returns: a distribution places them as it
    placed the base shard (``parallel/distribute.py``), since ZeRO-3 partitions them then."""

    def __init__(
        self,
        base: ExpertShard,
        gate_up_A: torch.Tensor,
        down_A: torch.Tensor,
        lora: LoraConfig,
        place: Callable[[list[nn.Parameter]], None] | None = None,
    ) -> None:
        super().__init__()
        (S, R, D), F_ = gate_up_A.shape, down_A.shape[2]
        self.gate_up_proj = base.gate_up_proj
        self.down_proj = base.down_proj
        self.scaling = lora.scaling
        self.gate_up_lora_A = nn.Parameter(gate_up_A.clone())
        self.gate_up_lora_B = nn.Parameter(torch.zeros(S, 2 * F_, R))
        self.down_lora_A = nn.Parameter(down_A.clone())
        self.down_lora_B = nn.Parameter(torch.zeros(S, D, R))
        if place is not None:
            place([self.gate_up_lora_A, self.gate_up_lora_B, self.down_lora_A, self.down_lora_B])

    def _lora(self, x_AI: torch.Tensor, a_SRI: torch.Tensor, b_SOR: torch.Tensor, counts_S: torch.Tensor):
        return _GroupedLinear.apply(_GroupedLinear.apply(x_AI, a_SRI, counts_S), b_SOR, counts_S) * self.scaling

    def forward(self, x_AD: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
        gate_up_AF2 = base_grouped(x_AD, self.gate_up_proj, counts_S)
        gate_up_AF2 = gate_up_AF2 + self._lora(x_AD, self.gate_up_lora_A, self.gate_up_lora_B, counts_S)
        h_AF = _SwiGLU.apply(gate_up_AF2)
        out_AD = base_grouped(h_AF, self.down_proj, counts_S)
        return out_AD + self._lora(h_AF, self.down_lora_A, self.down_lora_B, counts_S)

    def merged_weight(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """W[s] + scaling * B[s] A[s] for every expert s (a merge has to build the delta)."""
        return (weight.float() + torch.bmm(b.float(), a.float()) * self.scaling).to(weight.dtype)


# The adapters of a base parameter, by the base parameter's name in its module.
ADAPTERS = {
    LoraLinear: {"weight": ("lora_A", "lora_B")},
    LoraExpertShard: {
        "gate_up_proj": ("gate_up_lora_A", "gate_up_lora_B"),
        "down_proj": ("down_lora_A", "down_lora_B"),
    },
}


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def target_of(name: str) -> str | None:
    """The LoRA target group of the linear module ``name`` (a path in the model), or None (never adapted:
    a router such as ``mlp.gate``, the LM head)."""
    parts = name.split(".")
    if "self_attn" in parts:
        return "attention"
    if parts[-1] not in MLP_PROJECTIONS:
        return None
    if len(parts) >= 2 and parts[-2] == "shared_experts":
        return "shared_experts"
    if len(parts) >= 2 and parts[-2] == "mlp":
        return "dense"
    return None


def apply_lora(
    model: nn.Module, lora: LoraConfig, place: Callable[[list[nn.Parameter]], None] | None = None
) -> nn.Module:
    """Freeze every parameter of ``model`` and add adapters to the targets, in place; returns the model.

    Works under ``deepspeed.zero.Init`` (the base keeps its partitions; the new adapters are partitioned
    as they are created), so it runs inside the factory that builds the model.  Routed experts may be this
    rank's only (expert parallelism): shards are named by their global index; ``place`` is handed to each
    ``LoraExpertShard``."""
    cfg, layout = model.config, model.layout
    if "experts" in lora.targets and layout.moe_implementation != "shard":
        raise ValueError(
            f"LoRA on routed experts needs moe_implementation=shard (got {layout.moe_implementation}); "
            "use --moe-implementation shard"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        shards = [(n, c) for n, c in module.named_children() if isinstance(c, ExpertShard)]
        if shards and "experts" in lora.targets:
            S = layout.shard_size(cfg.num_experts)
            gate_up_A, down_A = _initial_expert_As(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, lora)
            for child_name, child in shards:
                rows = slice(int(child_name) * S, (int(child_name) + 1) * S)
                setattr(module, child_name, LoraExpertShard(child, gate_up_A[rows], down_A[rows], lora, place))
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and target_of(path) in lora.targets:
                setattr(module, child_name, LoraLinear(child, lora))
    return model


def _initial_expert_As(E: int, D: int, F_: int, lora: LoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's initial gate/up (E, R, D) and down (E, R, F) As, drawn for every expert in one order."""
    gate_up_A, down_A = torch.empty(E, lora.rank, D), torch.empty(E, lora.rank, F_)
    _init_A(gate_up_A, D)
    _init_A(down_A, F_)
    return gate_up_A, down_A


_EXPERT_ADAPTER = re.compile(r"^(.*\.experts\.)(\d+)\.((?:gate_up|down)_lora_[AB])$")


def adapter_keys(name: str, experts_per_shard: int) -> list[tuple[str, Slot]]:
    """The checkpoint keys of the adapter ``name`` (canonical) and where each lives in it: a routed expert
    shard's (S, ...) adapter is kept per expert (``...experts.{expert}.gate_up_lora_A``, (R, D)), so a
    checkpoint does not depend on the shard size or the EP degree; any other adapter is its own key."""
    m = _EXPERT_ADAPTER.match(name)
    if m is None:
        return [(name, Slot(name))]
    prefix, shard, leaf = m.group(1), int(m.group(2)), m.group(3)
    S = experts_per_shard
    return [(f"{prefix}{shard * S + i}.{leaf}", Slot(name, i)) for i in range(S)]


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` is a LoRA adapter (trained, saved in training checkpoints)."""
    return "lora_A" in name.rsplit(".", 1)[-1] or "lora_B" in name.rsplit(".", 1)[-1]


def adapted_modules(model: nn.Module):
    """(module name, module, {base parameter name: (A name, B name)}) of every adapted module."""
    for name, module in model.named_modules():
        for kind, adapters in ADAPTERS.items():
            if isinstance(module, kind):
                yield name, module, adapters
