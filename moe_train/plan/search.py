"""``moe-train plan --search``: the fastest configurations of a recipe that fit, by the planner's models.

The space: expert layout (``origin`` or shards of every divisor of the expert count), expert
parallel degree (every common divisor of the GPUs and the experts), Ulysses SP degree, tokens per
micro step (max_length: the recipe's and 2k to 64k), activation checkpointing, and ZeRO-3 offload (none, optimizer,
optimizer + params).  Pruned before any speed estimate, and counted:

* invalid: what the trainer refuses, by its own check (``ParallelDims.validate`` with the DeepSpeed
  config of the candidate's offload): SP must divide the GPUs (and, with GQA, the k/v heads); EP > 1
  needs the shard layout with the shard size dividing the experts per rank, no SP, no offload;
* model states: the partitioned weights, gradients and optimizer states alone exceed the GPU;
* dominated: a cheaper setting of the same configuration already fits, and costs no speed to
  use: a smaller SP degree (SP only shrinks the tokens each GPU amortises its gathers over),
  activation checkpointing off (it saves a recompute), less offload (the host is slower);
* does not fit: the memory model's peak exceeds the GPU (with EP, under worst-case routing skew).

With EP over expert-data-parallel groups of M > 1 ranks each fitting configuration is also timed with
``--hold-experts`` (the local experts gathered once per optimizer step and kept to it), which replaces it
only where it fits, is faster, and keeps the headroom the configuration had (``hold_experts`` of the row).

The training run stays the one the recipe describes: the global batch (tokens per optimizer step,
``gpus * tokens_per_rank * grad_accum``) is held by choosing grad_accum for each max_length and SP
degree, and a candidate that cannot hold it (a pack longer than a rank's share of the batch) changes
the run: it is timed at the recipe's grad_accum and shown apart, never ranked, unless ``free_batch``.
Without varlen, attention crosses the samples of a pack, so max_length is numerics and stays fixed too.

The rest are timed and ranked by TGS, ties by communication time, then memory; a configuration with
less free memory than ``headroom`` of the GPU ranks after every one that has it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from moe_train.models.common.experts import ExpertLayout
from moe_train.parallel.dims import ParallelDims
from moe_train.plan import HEADROOM_WARNING
from moe_train.plan.expert import predict_speed_ep
from moe_train.plan.memory import Workload, ZeroSettings, count_params, predict_memory
from moe_train.plan.speed import Device

MAX_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)
OFFLOADS = ("none", "optimizer", "optimizer+params")


@dataclass(frozen=True)
class Candidate:
    moe_implementation: str
    expert_in_one_shard: int | None
    ep: int
    sp: int
    max_length: int
    activation_checkpointing: bool
    offload: str
    grad_accum: int = 1
    hold_experts: bool = False

    def label(self) -> str:
        layout = "origin" if self.moe_implementation == "origin" else f"shard {self.expert_in_one_shard}"
        return (
            f"{layout}, ep {self.ep}{' hold' if self.hold_experts else ''}, sp {self.sp}, "
            f"max_length {self.max_length}, "
            f"checkpointing {'on' if self.activation_checkpointing else 'off'}, offload {self.offload}, "
            f"grad_accum {self.grad_accum}"
        )


@dataclass
class Ranked:
    candidate: Candidate
    per_gpu_gb: float
    headroom_gb: float
    tgs: float
    mfu: float
    bound: str
    comm_s: float  # communication per micro step: the tie-break between compute-bound candidates
    step_s: float = 0.0  # per optimizer step
    tight: bool = False  # less memory free than the search's headroom

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.candidate),
            "per_gpu_gb": round(self.per_gpu_gb, 2),
            "headroom_gb": round(self.headroom_gb, 2),
            "tgs": round(self.tgs, 1),
            "mfu": round(self.mfu, 4),
            "bound": self.bound,
            "comm_s": round(self.comm_s, 3),
            "step_s": round(self.step_s, 3),
            "tight": self.tight,
        }


@dataclass
class SearchResult:
    space: int
    pruned: dict[str, int]
    timed: int
    best: list[Ranked]
    global_batch: int = 0  # tokens per optimizer step held fixed (0: free)
    headroom: float = HEADROOM_WARNING
    other_batch: list[Ranked] = dataclasses.field(default_factory=list)  # fastest that change the batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "pruned": self.pruned,
            "timed": self.timed,
            "global_batch_tokens": self.global_batch or None,
            "headroom": self.headroom,
            "best": [r.to_dict() for r in self.best],
            "other_batch": [r.to_dict() for r in self.other_batch],
        }


def _zero(zero: ZeroSettings, offload: str) -> ZeroSettings:
    return dataclasses.replace(
        zero, stage=3, offload_optimizer=offload != "none", offload_param=offload == "optimizer+params"
    )


def offload_config(ds_config: dict[str, Any], offload: str) -> dict[str, Any]:
    """The DeepSpeed config a candidate runs with: ``ds_config`` at ZeRO stage 3 with ``offload``."""
    zero = dict(ds_config.get("zero_optimization", {}), stage=3)
    for what, on in (("optimizer", offload != "none"), ("param", offload == "optimizer+params")):
        zero[f"offload_{what}"] = {**(zero.get(f"offload_{what}") or {}), "device": "cpu" if on else "none"}
    return {**ds_config, "zero_optimization": zero}


def _layouts(cfg: Any, work: Workload) -> list[ExpertLayout]:
    E = cfg.num_experts
    shards = [ExpertLayout("shard", d) for d in range(1, E + 1) if E % d == 0]
    if work.lora is not None and "experts" in work.lora.targets:  # expert adapters need shards
        return shards
    return [ExpertLayout("origin"), *shards]


def _ep_degrees(cfg: Any, gpus: int) -> list[int]:
    return [n for n in range(1, gpus + 1) if gpus % n == 0 and cfg.num_experts % n == 0]


def _problem(cfg: Any, layout: ExpertLayout, gpus: int, sp: int, ep: int, ds_config: dict[str, Any]) -> str | None:
    """The trainer's refusal of this layout, or None."""
    try:
        ParallelDims(gpus, sp, ep).validate(cfg, layout, ds_config)
    except ValueError as e:
        return str(e)
    return None


def grad_accum_for(global_batch: int, gpus: int, tokens_per_rank: int) -> int | None:
    """The grad_accum that makes ``global_batch`` tokens per optimizer step at ``tokens_per_rank`` per micro
    step on ``gpus``, or None when none does (the micro step alone is bigger, or does not divide it)."""
    per_micro = gpus * tokens_per_rank
    if global_batch % per_micro or global_batch < per_micro:
        return None
    return global_batch // per_micro


def search(
    cfg: Any,
    work: Workload,
    zero: ZeroSettings,
    ds_config: dict[str, Any],
    gpus: int,
    nodes: int,
    device: Device,
    gpu_mem_gb: float,
    grad_accum: int = 1,
    peak_tflops: float | None = None,
    top: int = 5,
    headroom: float = HEADROOM_WARNING,
    free_batch: bool = False,
) -> SearchResult:
    """Rank the configurations of the module docstring that fit; ``work`` gives the fixed settings
    (varlen, attention, dtype, micro batch) and with ``grad_accum`` the global batch, ``ds_config`` the
    DeepSpeed config the offloads vary."""
    sps = [d for d in range(1, gpus + 1) if gpus % d == 0]
    layouts = _layouts(cfg, work)
    lengths = sorted({work.max_length, *MAX_LENGTHS}) if work.varlen or free_batch else [work.max_length]
    space = list(itertools.product(layouts, _ep_degrees(cfg, gpus), sps, lengths, (False, True), OFFLOADS))
    pruned = {"invalid": 0, "model states exceed the GPU": 0, "dominated": 0, "does not fit": 0}
    global_batch = gpus * work.tokens_per_rank * grad_accum
    # Model states alone per offload setting (a bound that needs no trace): weights, grads, optimizer.
    P = count_params(cfg)
    per_param = work.bytes if work.lora is not None else 2 * work.bytes + 12  # LoRA: the frozen base's weights
    states_gb = {
        "none": P * per_param / gpus / 2**30,
        "optimizer": P * work.bytes / gpus / 2**30,
        "optimizer+params": 0.0,
    }
    fits: dict[tuple, list] = {}
    refused: dict[tuple, bool] = {}  # the trainer's check, once per layout, degrees and offload
    ranked, other = [], []

    # Order: cheapest settings first, so a dominated one can be recognised when it comes.
    def order(c: tuple) -> tuple:
        layout, ep, sp, S, ac, offload = c
        return layout.moe_implementation, layout.expert_in_one_shard or 0, ep, S, OFFLOADS.index(offload), ac, sp

    for layout, ep, sp, S, ac, offload in sorted(space, key=order):
        impl, shard = layout.moe_implementation, layout.expert_in_one_shard
        z = _zero(zero, offload)
        rule = (layout, ep, sp, offload)
        if rule not in refused:
            refused[rule] = _problem(cfg, layout, gpus, sp, ep, offload_config(ds_config, offload)) is not None
        if refused[rule]:
            pruned["invalid"] += 1
            continue
        if states_gb[offload] > gpu_mem_gb:
            pruned["model states exceed the GPU"] += 1
            continue
        key = (impl, shard, ep, S)
        cheaper = [
            (sp2, ac2, off2)
            for (sp2, ac2, off2) in fits.get(key, ())
            if sp2 <= sp and (ac2 <= ac) and OFFLOADS.index(off2) <= OFFLOADS.index(offload)
        ]
        if cheaper:
            pruned["dominated"] += 1
            continue
        w = dataclasses.replace(work, max_length=S, sp=sp, activation_checkpointing=ac)
        mem = predict_memory(cfg, layout, w, z, gpus, ep)
        if mem.per_gpu_gb > gpu_mem_gb:
            pruned["does not fit"] += 1
            continue
        fits.setdefault(key, []).append((sp, ac, offload))
        accum = grad_accum_for(global_batch, gpus, w.tokens_per_rank)
        keeps = accum is not None
        if free_batch or not keeps:
            accum = grad_accum
        s = predict_speed_ep(cfg, layout, w, z, gpus, nodes, device, ep, accum, peak_tflops)
        hold = False
        tight = gpu_mem_gb - mem.per_gpu_gb < headroom * gpu_mem_gb
        # No step is shorter than its micro steps' compute, which a compute-bound configuration already
        # takes: holding cannot make it faster.  Over one rank (ep == gpus) the experts are kept whole already.
        if 1 < ep < gpus and s.comm_s > s.compute_s:
            s_held = predict_speed_ep(cfg, layout, w, z, gpus, nodes, device, ep, accum, peak_tflops, hold=True)
            if s_held.tgs > s.tgs:
                held = predict_memory(cfg, layout, w, z, gpus, ep, hold=True)
                room = gpu_mem_gb - held.per_gpu_gb
                if room >= 0 and (tight or room >= headroom * gpu_mem_gb):
                    hold, mem, s, tight = True, held, s_held, room < headroom * gpu_mem_gb
        r = Ranked(
            Candidate(impl, shard, ep, sp, S, ac, offload, accum, hold),
            mem.per_gpu_gb,
            gpu_mem_gb - mem.per_gpu_gb,
            s.tgs,
            s.mfu,
            s.bound,
            s.comm_s,
            s.step_s,
            tight,
        )
        (ranked if keeps or free_batch else other).append(r)

    # Configurations with the headroom first; compute-bound candidates tie on TGS: the one with less
    # communication to hide has the margin (a slower network, a skewed batch), then the one with more
    # memory free.
    def rank(r: Ranked) -> tuple:
        return r.tight, -round(r.tgs, 1), r.comm_s, r.per_gpu_gb

    ranked.sort(key=rank)
    other.sort(key=rank)
    return SearchResult(
        space=len(space),
        pruned=pruned,
        timed=len(ranked) + len(other),
        best=ranked[:top],
        global_batch=0 if free_batch else global_batch,
        headroom=headroom,
        other_batch=other[:top],
    )
