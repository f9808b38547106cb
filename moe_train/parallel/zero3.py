"""DeepSpeed ZeRO applied to a model from outside: the one module that knows DeepSpeed's internals.

- ``build``: construct the model under ``deepspeed.zero.Init`` so that no rank ever holds a full
  parameter (ZeRO-3), or plainly (ZeRO-0/1/2), and check the partitions' dtype.
- ``partition``: the flat element range of a parameter this rank owns, which the checkpoint loader
  fills from byte ranges of the safetensors files.
- ``gathered_parameters``: every parameter in full, one at a time, for the streamed HF export.
- ``apply_activation_checkpointing``: recompute each decoder layer in backward.
- ``initialize``: ``deepspeed.initialize`` with the trainer's optimizer and schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_zero3(ds_config: dict[str, Any]) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def build(factory: Callable[[], nn.Module], ds_config: dict[str, Any], dtype: torch.dtype,
          device: torch.device) -> nn.Module:
    """``factory()`` partitioned from the start under ZeRO-3, else materialised on ``device``."""
    import deepspeed

    zero3 = is_zero3(ds_config)
    # dtype comes from the config's bf16 block: an explicit dtype= is ignored on CPU by
    # DeepSpeed 0.19 (operator precedence in Init._set_dtype), which silently gave bf16 weights.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3, mem_efficient_linear=False):
        model = factory()
    if not zero3:
        return model.to(device=device, dtype=dtype)
    wrong = {p.ds_tensor.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise ValueError(f"ZeRO-3 partitions are {sorted(map(str, wrong))}, expected {dtype}; set the DeepSpeed "
                         'config\'s "bf16": {"enabled": "auto"} (or match the recipe\'s dtype)')
    return model


def partition(param: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(this rank's flat partition, its first element) of a ZeRO-3 parameter; None if not partitioned."""
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is None:
        return None
    return ds_tensor.data, ds_tensor.ds_numel * dist.get_rank(group=param.ds_process_group)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as the model defines it (ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def gathered(param: torch.Tensor):
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def gathered_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, gathered one at a time; a collective on every rank.

    The tensor is valid only until the next item is asked for (its gather is then released).
    """
    for name, param in model.named_parameters():
        with gathered(param):
            yield name, param.data


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Wrap each layer so its activations are recomputed in backward (non-reentrant, ZeRO-3 safe:
    the recompute calls the module again, so DeepSpeed's hooks gather its parameters again).

    The wrapper adds ``_checkpoint_wrapped_module.`` to parameter names; the key map strips it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """The DeepSpeed engine and its scheduler (the process group already exists)."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config, dist_init_required=False)
    return engine, scheduler
