"""A model's distribution, applied in one place from its ``ParallelDims``: built partitioned under ZeRO-3
(``zero3.py``) with this rank's routed experts only under expert parallelism (``expert.py``), filled
with its weights, its attention wrapped for sequence parallelism (``sequence.py``), one ZeRO-3 gather
per dense block (``zero3.coalesce_gathers``), its decoder layers wrapped for activation checkpointing.
The model code itself knows none of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.lora import LoraConfig, apply_lora
from moe_train.models.common.spec import spec_of
from moe_train.parallel import expert, zero3
from moe_train.parallel.dims import ParallelDims


def distributed_model(
    cfg: Any,
    layout: ExpertLayout,
    dims: ParallelDims,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    activation_checkpointing: bool,
    fill: Callable[[nn.Module], None] | None = None,
    lora: LoraConfig | None = None,
) -> nn.Module:
    """This rank's part of the model (``dims.create_groups`` has run).  ``fill(model)`` puts the weights
    into the partitions before any wrapper renames a parameter (None: a training checkpoint will).
    ``lora``: the base frozen and adapters added as the model is built (``models/common/lora.py``)."""
    spec = spec_of(cfg)

    def build() -> nn.Module:
        model = spec.build(cfg, layout)
        if dims.experts is not None:
            # The local experts' random start (the weights overwrite it) must not shift the draws that follow:
            # the adapters' As are then those of EP 1.
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                expert.apply(model, dims.experts)
        if lora is not None:  # an expert's adapters partitioned as the expert: over its expert-data-parallel group
            place = None if dims.experts is None else functools.partial(expert.place, groups=dims.experts)
            apply_lora(model, lora, place)
        return model

    model = zero3.build(build, ds_config, dtype, device)
    if fill is not None:
        fill(model)
    if dims.seq is not None:
        dims.seq.apply(model, spec)
    # Before the checkpoint wrappers: the units are a layer's own blocks.  Not with LoRA: with the
    # base frozen, DeepSpeed 0.19.8's backward of a unit met a released (0-element) weight
    # (tests/test_lora.py, ZeRO-3 on 2 ranks), so LoRA keeps one gather per module.
    if zero3.is_zero3(ds_config) and lora is None:
        routed = {m.experts for m in model.modules() if isinstance(m, spec.moe_types)}
        zero3.coalesce_gathers(spec.layers(model), routed)
    if activation_checkpointing:
        zero3.apply_activation_checkpointing(spec.layers(model))
    return model


def gathered_parameters(model: nn.Module, dims: ParallelDims) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter of the whole model, one at a time, full on rank 0; a
    collective on every rank (``zero3.gathered_parameters``, or each expert from its owner under EP)."""
    if dims.experts is None:
        return zero3.gathered_parameters(model)
    return expert.gathered_parameters(model, dims.experts)


def all_experts(dims: ParallelDims) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer's per-expert rows from this rank's (``expert.all_experts`` under EP; all of them already without)."""
    if dims.experts is None:
        return lambda local: local
    return functools.partial(expert.all_experts, groups=dims.experts)
