"""The model of a run inside its DeepSpeed engine: partitioned from the start, its weights, the
optimizer (AdamW, or DeepSpeed's CPU Adam when ZeRO offloads it) and the cosine LR schedule."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch

from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.lora import LoraConfig
from moe_train.parallel import zero3
from moe_train.parallel.dims import ParallelDims
from moe_train.parallel.distribute import distributed_model
from moe_train.recipes import Recipe


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _UnseenOutputFilter(logging.Filter):
    """Drops DeepSpeed's per-run warning that it cannot see the tensors inside the model's output
    (``CausalLMOutput``, a dataclass).  It concerns the backward hooks of the outermost module only,
    which owns no parameter of its own (every parameter sits in a submodule whose inputs and outputs
    are plain tensors), so those hooks have nothing to fetch or release."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unknown inputs or outputs type" not in record.getMessage()


_UNSEEN_OUTPUT = _UnseenOutputFilter()


def import_deepspeed():
    """DeepSpeed, imported without MLflow.

    DeepSpeed's autotuner, which a training run never uses, imports MLflow at import time whenever it is
    installed (the ``mlflow`` extra): about 2 s of CPU on every rank at every start.  MLflow is hidden
    while DeepSpeed loads and visible again afterwards, so ``--report-to mlflow`` imports it on rank 0.
    """
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed catches
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def quiet_deepspeed() -> None:
    import_deepspeed()  # the trainer's first import of DeepSpeed
    from deepspeed.utils import logger

    logger.addFilter(_UNSEEN_OUTPUT)  # once: a filter already there is not added again


def build_model(
    cfg: Any,
    layout: ExpertLayout,
    dims: ParallelDims,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    model_url: str | None,
    seed: int,
    activation_checkpointing: bool,
    load_weights: bool = True,
    lora: LoraConfig | None = None,
) -> torch.nn.Module:
    """This rank's part of the model, distributed as ``dims`` says (``moe_train/parallel/distribute.py``),
    its partitions filled from the source (unless a training checkpoint is about to overwrite them)."""
    from moe_train.checkpoint.hf_layout import load_into
    from moe_train.engine.weights import open_source

    def fill(model: torch.nn.Module) -> None:
        load_into(model, open_source(model, model_url, seed), partition=zero3.partition)

    return distributed_model(
        cfg, layout, dims, ds_config, dtype, device, activation_checkpointing, fill if load_weights else None, lora
    )


def build_engine(
    r: Recipe,
    cfg: Any,
    layout: ExpertLayout,
    dims: ParallelDims,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    schedule_steps: int,
    lora: LoraConfig | None = None,
    load_weights: bool = True,
) -> tuple[Any, Any]:
    """The partitioned model, AdamW and the cosine schedule inside a DeepSpeed engine.  The optimizer holds
    the trainable parameters only: with LoRA the adapters, so DeepSpeed keeps no fp32 master copy and no
    Adam moments of the frozen base."""
    from moe_train.engine.deepspeed_config import fill_auto, offloads_optimizer

    ds_config = fill_auto(
        ds_config,
        micro_batch_size=1,
        grad_accum=r.grad_accum,
        world_size=dims.world,
        grad_clip=r.max_grad_norm,
        bf16=dtype == torch.bfloat16,
        hidden_size=cfg.hidden_size,
    )
    model = build_model(
        cfg, layout, dims, ds_config, dtype, device, r.model, r.seed, r.activation_checkpointing, load_weights, lora
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if offloads_optimizer(ds_config):  # the optimizer runs on host memory: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_steps, r.warmup_ratio, r.min_lr_ratio))
    return zero3.initialize(model, optimizer, scheduler, ds_config)
