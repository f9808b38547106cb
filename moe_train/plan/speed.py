"""Step time, tokens per GPU per second (TGS) and MFU of a ZeRO run: an estimate from FLOPs and bytes.

FLOPs per token (model FLOPs, what MFU counts):
    6 * N_active + 3 * L * H * (qk_head_dim + v_head_dim) * S
N_active is every weight a token multiplies through (attention, dense MLPs, router, top-k and
shared experts, lm_head; not the embedding lookup).  The attention term is 2 FLOPs per
multiply-add, over QK^T (qk_head_dim) and PV (v_head_dim), averaged over the S/2 keys a causal
token sees, times 3 for forward + backward; S is max_length (an upper bound with varlen, where
a token only sees its own sample).  The hardware does more: activation checkpointing recomputes
the forward (+2 * N_active, + a third of the attention term), and eager attention computes all
S x S scores (twice the causal attention work).

Time per micro step = max(compute, communication): ZeRO-3 prefetching overlaps the gathers with
compute.  compute = tokens * hardware FLOPs / (peak * ACHIEVED_FRACTION).  communication = bytes
/ per-GPU bandwidth + collectives * latency, where bytes per GPU for a ring collective of M bytes
over N ranks are M * (N - 1) / N and one collective costs (N - 1) * COLLECTIVE_STEP_LATENCY.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.plan.memory import Unit, Workload, ZeroSettings, active_matmul_params, model_units

# Share of peak the matmuls reach in practice (assumed).
ACHIEVED_FRACTION = 0.5
# Latency of one ring step of an NCCL collective (assumed).
COLLECTIVE_STEP_LATENCY = 5e-6
# CPU Adam throughput per rank and host<->device bandwidth, for offloaded optimizers (assumed).
CPU_ADAM_PARAMS_PER_S = 1e9
PCIE_GBPS = 20.0
# HBM bytes an on-GPU Adam step moves per parameter (read/write master, m, v; grad; new weight).
ADAM_BYTES_PER_PARAM = 40


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16
    hbm_gbps: float
    nvlink_gbps: float  # effective per-GPU bus bandwidth of a collective inside a node
    network_gbps: float  # effective per-GPU bandwidth between nodes (one NIC per GPU)


DEVICES = {
    "a100": Device("A100", peak_tflops=312, hbm_gbps=2039, nvlink_gbps=240, network_gbps=23),  # HDR 200 Gb/s
    "h100": Device("H100", peak_tflops=989, hbm_gbps=3350, nvlink_gbps=370, network_gbps=45),  # NDR 400 Gb/s
    "h200": Device("H200", peak_tflops=989, hbm_gbps=4800, nvlink_gbps=370, network_gbps=45),
}


@dataclass
class SpeedEstimate:
    model_flops_per_token: float
    hardware_flops_per_token: float
    compute_s: float  # per micro step
    comm_s: float  # per micro step
    comm_bytes: float  # per micro step, per GPU
    collectives: int  # per micro step
    optimizer_s: float  # per optimizer step
    step_s: float  # per optimizer step (grad_accum micro steps + the update)
    tgs: float  # tokens per GPU per second
    mfu: float

    @property
    def bound(self) -> str:
        return "communication" if self.comm_s > self.compute_s else "compute"


def flops_per_token(cfg: DeepseekV2Config, work: Workload) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token; see the module docstring."""
    n_active = active_matmul_params(cfg)
    attn = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * work.max_length
    model = 6 * n_active + attn
    attn_hw = attn * (2 if work.attention == "eager" else 1)
    if work.activation_checkpointing:
        return model, 8 * n_active + attn_hw * 4 / 3
    return model, 6 * n_active + attn_hw


def _collectives(units: list[Unit], bucket: int) -> int:
    """Collectives to move ``units`` in order when consecutive ones are coalesced up to ``bucket`` numel."""
    n, acc = 0, 0
    for u in units:
        acc += u.numel
        if acc >= bucket:
            n, acc = n + 1, 0
    return n + (acc > 0)


def predict_speed(
    cfg: DeepseekV2Config, work: Workload, zero: ZeroSettings, gpus: int, nodes: int, device: Device,
    grad_accum: int = 1, peak_tflops: float | None = None,
) -> SpeedEstimate:
    peak = (peak_tflops or device.peak_tflops) * 1e12
    b = work.bytes
    model_flops, hw_flops = flops_per_token(cfg, work)
    T = work.tokens_per_rank
    compute = T * hw_flops / (peak * ACHIEVED_FRACTION)

    embed, layers, head = model_units(cfg)
    units = [embed, *(u for layer in layers for u in layer), *head]
    P = sum(u.numel for u in units)
    N = gpus
    ring = (N - 1) / N
    latency = (N - 1) * COLLECTIVE_STEP_LATENCY
    bw = (device.network_gbps if nodes > 1 else device.nvlink_gbps) * 1e9

    if zero.stage >= 3:
        gathered = [u for u in units if u.numel >= zero.param_persistence_threshold]
        P_g = sum(u.numel for u in gathered)
        gathers = 3 if work.activation_checkpointing else 2  # forward, (recompute,) backward
        comm_bytes = (gathers + 1) * P_g * b * ring  # + one reduce-scatter of the grads
        n_coll = gathers * _collectives(gathered, max(zero.prefetch_bucket_size, 1))
        n_coll += _collectives(gathered, zero.reduce_bucket_size)
    elif zero.stage == 2:  # reduce-scatter each micro step; weights all-gathered after the update
        comm_bytes = P * b * ring * (1 + 1 / grad_accum)
        n_coll = math.ceil(P / zero.reduce_bucket_size) * 2
    else:  # all-reduce (= reduce-scatter + all-gather) each micro step
        comm_bytes = 2 * P * b * ring
        n_coll = math.ceil(P / zero.reduce_bucket_size)
    if work.sp > 1:  # Ulysses: q, k, v and the output re-sharded (all-to-all) in every layer and pass
        passes = 3 if work.activation_checkpointing else 2
        per_token = cfg.num_attention_heads * (3 * cfg.qk_head_dim + cfg.v_head_dim) * b
        comm_bytes += passes * cfg.num_hidden_layers * T * per_token * (work.sp - 1) / work.sp
        n_coll += passes * cfg.num_hidden_layers * 4
    comm = comm_bytes / bw + n_coll * latency

    partition = P / N if zero.stage >= 1 else P
    if zero.offload_optimizer:
        optimizer = partition / CPU_ADAM_PARAMS_PER_S + partition * (b + 4) / (PCIE_GBPS * 1e9)
    else:
        optimizer = partition * ADAM_BYTES_PER_PARAM / (device.hbm_gbps * 1e9)

    step = grad_accum * max(compute, comm) + optimizer
    tgs = grad_accum * T / step
    return SpeedEstimate(
        model_flops_per_token=model_flops, hardware_flops_per_token=hw_flops, compute_s=compute, comm_s=comm,
        comm_bytes=comm_bytes, collectives=n_coll, optimizer_s=optimizer, step_s=step, tgs=tgs,
        mfu=tgs * model_flops / peak,
    )
