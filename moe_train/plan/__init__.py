"""``moe-train plan``: will a recipe fit on N GPUs, how fast, and with which expert shards and SP degree.

``memory.predict_memory`` and ``speed.predict_speed`` are pure models; this module resolves a
recipe and a DeepSpeed config into their inputs and adds the two suggestions.  Everything here
is an estimate from first principles, not a measurement.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_train.engine.deepspeed_config import load_deepspeed_config
from moe_train.models import families, spec_for
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.lora import LoraConfig
from moe_train.parallel.dims import ParallelDims
from moe_train.plan.expert import predict_speed_ep
from moe_train.plan.memory import GiB, MemoryEstimate, Workload, ZeroSettings, predict_memory
from moe_train.plan.speed import DEVICES, Device, SpeedEstimate, predict_speed
from moe_train.recipes import Recipe, get_recipe
from moe_train.storage import resolve

__all__ = [
    "Plan",
    "Workload",
    "ZeroSettings",
    "build_plan",
    "load_deepspeed_config",
    "model_config",
    "model_layout",
    "predict_memory",
    "predict_speed",
    "suggest_expert_in_one_shard",
    "suggest_sp",
]

# Fitting with less free memory than this share of the GPU is worth a warning.
HEADROOM_WARNING = 0.10
# A shard size whose step time is within this share of the fastest fitting one is fast enough.
SHARD_TIME_TOLERANCE = 0.02


def read_model_config(path_or_url: str) -> Any:
    """A config.json of a registered family, or the config.json of an HF checkpoint directory: a local
    path or an fsspec URL (file://, s3://, gs://, ...)."""
    from moe_train.checkpoint.hf_layout import read_config

    if not path_or_url.rstrip("/").endswith(".json"):
        return read_config(path_or_url)
    fs, path = resolve(path_or_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{path_or_url} does not exist; pass a config.json or an HF checkpoint directory")
    with fs.open(path, "r") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path_or_url} is not JSON ({e}); pass a model's config.json") from None
    return spec_for(d.get("model_type")).config(d)


def model_config(recipe: Recipe) -> Any:
    """The model a recipe trains: a named size, a known HF id (a family's ``hub_sizes``), or a
    config.json / HF directory (local or a URL)."""
    if recipe.model_size:
        return spec_for(recipe.family).named_config(recipe.model_size)
    hub_id = (recipe.model or "").removeprefix("hf://")
    for spec in families():  # the size of a known HF id, in whichever family has it
        if hub_id in spec.hub_sizes:
            return spec.named_config(spec.hub_sizes[hub_id])
    if recipe.model and (
        recipe.model.endswith(".json") or "://" in recipe.model or (Path(recipe.model) / "config.json").is_file()
    ):
        return read_model_config(recipe.model)
    raise ValueError(
        f"cannot size model {recipe.model!r} of recipe {recipe.name!r}: use a named size "
        f"({', '.join(sorted(s for spec in families() for s in spec.hub_ids))}), one of "
        f"{', '.join(h for spec in families() for h in spec.hub_sizes)}, or a local checkpoint directory"
    )


def model_layout(recipe: Recipe, cfg: Any) -> ExpertLayout:
    """The recipe's expert layout, checked against the model's expert count."""
    layout = ExpertLayout(recipe.moe_implementation, recipe.expert_in_one_shard)
    layout.check(cfg.num_experts)
    return layout


SEED_RECIPE = "deepseek_v2_chat_full_alpaca_e3"


def seed_row_inputs(max_length: int, moe_implementation: str, varlen: bool):
    """(model, expert layout, workload, ZeRO settings, grad_accum) of one row of XTuner's table: the 236B
    recipe on 128 A100 with the row's length, layout and varlen; HF rows run flash attention, except 16k
    without varlen, which is HF eager."""
    recipe = get_recipe(SEED_RECIPE).replace(
        max_length=max_length, moe_implementation=moe_implementation, varlen=varlen
    )
    attention = "eager" if moe_implementation == "origin" and not varlen and max_length > 8192 else "flash"
    cfg = model_config(recipe)
    zero = ZeroSettings.from_ds_config(load_deepspeed_config(recipe.deepspeed), cfg.hidden_size)
    return cfg, model_layout(recipe, cfg), workload(recipe, attention), zero, recipe.grad_accum


def workload(recipe: Recipe, attention: str = "flash") -> Workload:
    """What one GPU computes per micro step under ``recipe``."""
    return Workload(
        max_length=recipe.max_length,
        micro_batch_size=recipe.micro_batch_size,
        varlen=recipe.varlen,
        attention=attention,
        activation_checkpointing=recipe.activation_checkpointing,
        dtype=recipe.dtype,
        sp=recipe.sp,
        device="cuda",  # the trainer runs fp32 recipes (tiny) in fp32 on GPU too
        lora=(
            LoraConfig(recipe.lora_rank, recipe.lora_alpha, recipe.lora_dropout, tuple(recipe.lora_targets))
            if recipe.lora_rank
            else None
        ),
    )


def _fits(mem: MemoryEstimate, gpu_mem_gb: float) -> bool:
    return mem.per_gpu_gb <= gpu_mem_gb


def suggest_expert_in_one_shard(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    gpus: int,
    nodes: int,
    device: Device,
    gpu_mem_gb: float,
    grad_accum: int = 1,
    peak_tflops: float | None = None,
) -> int | None:
    """The smallest divisor of the expert count whose predicted step time is within 2% of the
    fastest shard size that fits.  Bigger shards mean fewer, larger all-gathers (less latency)
    but a bigger gathered working set; past that point they buy no speed, only memory.  None when
    no shard size fits; the shard size is moot without ZeRO-3 (the configured one is returned)."""
    E = cfg.num_experts
    if zero.stage < 3:
        return layout.shard_size(E)
    timed = {}
    for d in (d for d in range(1, E + 1) if E % d == 0):
        shards = ExpertLayout("shard", d)
        if _fits(predict_memory(cfg, shards, work, zero, gpus), gpu_mem_gb):
            timed[d] = predict_speed(cfg, shards, work, zero, gpus, nodes, device, grad_accum, peak_tflops).step_s
    if not timed:
        return None
    best = min(timed.values())
    return min(d for d, t in timed.items() if t <= best * (1 + SHARD_TIME_TOLERANCE))


def suggest_sp(
    cfg: Any, layout: ExpertLayout, work: Workload, zero: ZeroSettings, gpus: int, gpu_mem_gb: float
) -> int | None:
    """The smallest Ulysses degree the trainer accepts (``ParallelDims.validate``) that fits.  Each rank
    then holds 1/sp of the activations and logits (the eager mask and the model states do not shrink).
    None when no degree fits."""
    for sp in range(1, gpus + 1):
        try:
            ParallelDims(gpus, sp).validate(cfg, layout, None)
        except ValueError:
            continue
        w = dataclasses.replace(work, sp=sp)
        if _fits(predict_memory(cfg, layout, w, zero, gpus), gpu_mem_gb):
            return sp
    return None


def calibration_warnings(device: Device) -> list[str]:
    if device.calibration.calibrated:
        return []
    return [
        f"{device.name} speed: {device.calibration.source}; only A100 is fitted on a published table "
        "(XTuner's), so treat TGS and MFU as rough"
    ]


@dataclass
class Plan:
    recipe: str
    gpus: int
    nodes: int
    gpu_mem_gb: float
    device: Device
    model: Any
    layout: ExpertLayout
    work: Workload
    zero: ZeroSettings
    ep: int
    grad_accum: int
    deepspeed: str
    ds_config: dict[str, Any]
    memory: MemoryEstimate
    speed: SpeedEstimate
    peak_tflops: float
    suggested_expert_in_one_shard: int | None
    suggested_sp: int | None
    headroom: float = HEADROOM_WARNING  # share of the GPU a configuration should leave free
    hold_experts: bool = False  # --hold-experts: the local experts gathered once per step (with ep > 1)

    @property
    def fits(self) -> bool:
        return _fits(self.memory, self.gpu_mem_gb)

    @property
    def headroom_gb(self) -> float:
        return self.gpu_mem_gb - self.memory.per_gpu_gb

    @property
    def warnings(self) -> list[str]:
        """What the reader must not miss: thin headroom, and constants that were never fitted."""
        out = []
        if self.fits and self.headroom_gb < self.headroom * self.gpu_mem_gb:
            out.append(
                f"headroom {self.headroom_gb:.1f} GB is under {self.headroom:.0%} of the "
                f"{self.gpu_mem_gb:g} GB GPU: fragmentation or a step that differs from the model can "
                "run out of memory; use more GPUs, a smaller expert_in_one_shard or a shorter max_length"
            )
        return out + calibration_warnings(self.device)

    def to_dict(self) -> dict[str, Any]:
        mem = self.memory
        return {
            "recipe": self.recipe,
            "gpus": self.gpus,
            "nodes": self.nodes,
            "gpu": self.device.name,
            "gpu_mem_gb": self.gpu_mem_gb,
            "deepspeed": self.deepspeed,
            "zero": self.zero.__dict__,
            "workload": dataclasses.asdict(self.work),
            "ep": self.ep,
            "hold_experts": self.hold_experts,
            "grad_accum": self.grad_accum,
            "moe_implementation": self.layout.moe_implementation,
            "expert_in_one_shard": (
                self.layout.shard_size(self.model.num_experts) if self.layout.moe_implementation == "shard" else None
            ),
            "params": mem.params,
            "fits": self.fits,
            "per_gpu_gb": round(mem.per_gpu_gb, 3),
            "headroom_gb": round(self.headroom_gb, 3),
            "peak_phase": mem.peak_phase,
            "breakdown": {k: round(v, 3) for k, v in mem.breakdown_gb().items()},
            "phases_gb": {p: {k: round(v / GiB, 3) for k, v in terms.items()} for p, terms in mem.phases.items()},
            "cpu_gb_per_gpu": round(mem.cpu_bytes / GiB, 3),
            "peak_tflops": self.peak_tflops,
            "step_time_s": round(self.speed.step_s, 3),
            "compute_s_per_micro_step": round(self.speed.compute_s, 4),
            "comm_s_per_micro_step": round(self.speed.comm_s, 4),
            "exposed_comm_s_per_micro_step": round(self.speed.exposed_comm_s, 4),
            "hooks_s_per_micro_step": round(self.speed.hooks_s, 4),
            "speed_calibrated": self.device.calibration.calibrated,
            "warnings": self.warnings,
            "bound": self.speed.bound,
            "model_flops_per_token": self.speed.model_flops_per_token,
            "tgs_estimate": round(self.speed.tgs, 2),
            "mfu_estimate": round(self.speed.mfu, 4),
            "suggested_expert_in_one_shard": self.suggested_expert_in_one_shard,
            "suggested_sp": self.suggested_sp,
        }


def build_plan(
    recipe: Recipe,
    gpus: int,
    gpu_mem_gb: float,
    nodes: int = 1,
    device: str = "a100",
    ds_config: dict[str, Any] | None = None,
    attention: str = "flash",
    peak_tflops: float | None = None,
    headroom: float = HEADROOM_WARNING,
) -> Plan:
    """Plan ``recipe`` (already carrying any overrides: max_length, varlen, layout, DeepSpeed config) on
    ``gpus``; refused (ValueError) where the trainer would refuse the recipe's layout on ``gpus`` ranks."""
    cfg = model_config(recipe)
    layout = model_layout(recipe, cfg)
    ds = ds_config if ds_config is not None else load_deepspeed_config(recipe.deepspeed)
    hold = recipe.hold_experts
    ParallelDims(gpus, recipe.sp, recipe.ep, hold_experts=hold).validate(cfg, layout, ds)  # the trainer's check
    zero = ZeroSettings.from_ds_config(ds, cfg.hidden_size)
    work = workload(recipe, attention)
    dev = DEVICES[device]
    mem = predict_memory(cfg, layout, work, zero, gpus, recipe.ep, hold)
    speed = predict_speed_ep(cfg, layout, work, zero, gpus, nodes, dev, recipe.ep, recipe.grad_accum, peak_tflops, hold)
    return Plan(
        recipe=recipe.name,
        gpus=gpus,
        nodes=nodes,
        gpu_mem_gb=gpu_mem_gb,
        device=dev,
        model=cfg,
        layout=layout,
        work=work,
        zero=zero,
        ep=recipe.ep,
        grad_accum=recipe.grad_accum,
        deepspeed=recipe.deepspeed,
        ds_config=ds,
        memory=mem,
        speed=speed,
        peak_tflops=peak_tflops or dev.peak_tflops,
        suggested_expert_in_one_shard=suggest_expert_in_one_shard(
            cfg, layout, work, zero, gpus, nodes, dev, gpu_mem_gb, recipe.grad_accum, peak_tflops
        ),
        suggested_sp=suggest_sp(cfg, layout, work, zero, gpus, gpu_mem_gb),
        headroom=headroom,
        hold_experts=hold,
    )
