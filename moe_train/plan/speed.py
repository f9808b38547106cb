"""Step time, tokens per GPU per second (TGS) and MFU of a ZeRO run: a timeline of one micro step.

Model FLOPs per token (what MFU counts): 6 * N_active + the attention term, 3 x the attention's
forward FLOPs per (query, key) pair (``AttentionShape.flops_per_key``: 2 * L * H * (qk + v)) * keys,
where keys is the mean number of earlier tokens a token attends to: max_length / 2 over a packed
row without varlen, E[s^2] / (2 E[s]) over the alpaca sample lengths with varlen
(``calibration.ALPACA_*``).  The hardware does more: activation checkpointing recomputes every
forward, and eager attention computes all S x S scores.

ZeRO-3 is timed by replaying the module trace of a step (``memory.step_trace``) through the same
gather schedule the memory model uses (``memory.gather_schedule``), on two streams:

* compute: each module's GEMMs (2 x tokens through it x its numel, twice that in the backward) at
  ``gemm_efficiency`` of peak, the attention kernel after the unit the family marks
  (``Unit.attention_kernel``: MLA's kv_b_proj) at its own efficiency, and ``hook_s`` of host time
  per parameter for every module call (ZeRO-3's pre- and post-module hooks: fetch, wait, release,
  partitioning the gradient);
* communication, in issue order: every all-gather the schedule issues and every gradient bucket's
  reduce-scatter, each costing (N - 1) ring steps of latency plus bytes * (N - 1) / N over the
  per-GPU bandwidth (the network between nodes, NVLink inside one).

A module waits for its own gather; a gather the coordinator prefetched runs behind the compute of
the modules before it, so how much communication hides is bounded by the prefetch bucket (at
least one module ahead).  The trace is periodic in the layers: the timeline of the first dense
layers plus two and three MoE layers is run, and the difference extrapolated to the full depth.
ZeRO-1/2 and the SP all-to-alls keep the simpler closed forms.  The free constants live in
``calibration.py`` with where each came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moe_train.engine.metrics import active_matmul_params
from moe_train.models import spec_of
from moe_train.models.common.experts import ExpertLayout
from moe_train.plan import calibration
from moe_train.plan.calibration import Calibration
from moe_train.plan.lora import adapters, by_traced_name
from moe_train.plan.memory import (
    Unit,
    Workload,
    ZeroSettings,
    gather_key,
    gather_schedule,
    memo,
    model_units,
    step_trace,
)

# CPU Adam throughput per rank and host<->device bandwidth, for offloaded optimizers (assumed).
CPU_ADAM_PARAMS_PER_S = 1e9
PCIE_GBPS = 20.0
# HBM bytes an on-GPU Adam step moves per parameter (read/write master, m, v; grad; new weight).
ADAM_BYTES_PER_PARAM = 40


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16 (for the CPU device: the measured fp32 matmul rate of one rank)
    hbm_gbps: float
    nvlink_gbps: float  # effective per-GPU bus bandwidth of a collective inside a node
    network_gbps: float  # effective per-GPU bandwidth between nodes (one NIC per GPU)
    calibration: Calibration = field(default=calibration.A100)


DEVICES = {
    "a100": Device("A100", peak_tflops=312, hbm_gbps=2039, nvlink_gbps=240, network_gbps=calibration.SEED_NETWORK_GBPS),
    "h100": Device(
        "H100",
        peak_tflops=989,
        hbm_gbps=3350,
        nvlink_gbps=370,
        network_gbps=45,  # NDR 400 Gb/s
        calibration=calibration.UNCALIBRATED_GPU,
    ),
    "h200": Device(
        "H200",
        peak_tflops=989,
        hbm_gbps=4800,
        nvlink_gbps=370,
        network_gbps=45,
        calibration=calibration.UNCALIBRATED_GPU,
    ),
}


@dataclass
class SpeedEstimate:
    model_flops_per_token: float
    hardware_flops_per_token: float
    compute_s: float  # per micro step: GEMMs and attention kernels
    comm_s: float  # per micro step: all collectives back to back, hidden or not
    exposed_comm_s: float  # per micro step: time compute waited for communication
    hooks_s: float  # per micro step: ZeRO-3 host time per parameter and module call
    comm_bytes: float  # per micro step, per GPU
    collectives: int  # per micro step
    optimizer_s: float  # per optimizer step
    step_s: float  # per optimizer step (grad_accum micro steps + the update)
    tgs: float  # tokens per GPU per second
    mfu: float
    comm_hidden_s: float = 0.0  # per micro step: communication on the critical path that overlapping hides

    @property
    def micro_step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.hooks_s

    @property
    def bound(self) -> str:
        """The largest share of a micro step: compute, communication (exposed) or ZeRO-3 hooks."""
        parts = {"compute": self.compute_s, "communication": self.exposed_comm_s, "ZeRO-3 hooks": self.hooks_s}
        return max(parts, key=parts.get)


def attention_keys(work: Workload) -> float:
    """Mean keys per token of causal attention: a whole packed row, or (varlen) its own sample."""
    S = work.max_length
    if not work.varlen:
        return S / 2
    mu, sigma = math.log(calibration.ALPACA_LOG_MEDIAN_TOKENS), calibration.ALPACA_LOG_SIGMA
    mean, mean_sq = math.exp(mu + sigma**2 / 2), math.exp(2 * mu + 2 * sigma**2)
    return min(mean_sq / (2 * mean), S / 2)


def _attention_flops(cfg: Any, work: Workload) -> float:
    """Forward FLOPs of all layers' attention kernels per token (QK^T and PV over the keys seen)."""
    keys = work.max_length if work.attention == "eager" else attention_keys(work)  # eager: every S x S score
    return spec_of(cfg).attention(cfg).flops_per_key * keys


def flops_per_token(cfg: Any, work: Workload, layout: ExpertLayout | None = None) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token; see the module docstring.  With LoRA a frozen weight's
    backward is its input gradient only (2 * N_active fewer), the adapters' GEMMs count in full."""
    n_active = active_matmul_params(cfg)
    model = 6 * n_active + 3 * spec_of(cfg).attention(cfg).flops_per_key * attention_keys(work)
    passes = 4 if work.activation_checkpointing else 3
    hardware = 2 * passes * n_active + passes * _attention_flops(cfg, work)
    if work.lora is not None:
        a_active = adapters(cfg, layout or ExpertLayout(), work.lora).active_numel(cfg)
        model += 6 * a_active - 2 * n_active
        hardware += 2 * passes * a_active - 2 * n_active
    return model, hardware


def _tokens_through(cfg: Any, unit: Unit, tokens: float) -> float:
    """Tokens a module multiplies: a routed expert sees top_k / E of them."""
    if unit.name.split(".", 1)[-1].startswith("embed_tokens"):
        return 0.0  # a lookup
    if unit.expert is not None:
        return tokens * cfg.experts_per_token / cfg.num_experts
    return tokens


@dataclass
class _Timeline:
    time_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    hooks_s: float = 0.0
    comm_bytes: float = 0.0
    collectives: int = 0


def _ring(numel: float, b: int, N: int, bw: float, cal: Calibration) -> float:
    return (N - 1) * cal.ring_step_latency_s + numel * b * (N - 1) / N / bw


_SCHEDULES: dict[tuple, tuple] = {}


def _schedule(cfg: Any, layout: ExpertLayout, work: Workload, zero: ZeroSettings) -> tuple:
    """(step trace, gathers issued per entry), cached: the search and the fits time one trace many times."""
    key = (repr(cfg), layout, work.activation_checkpointing, gather_key(zero), work.lora)
    if key not in _SCHEDULES:
        if len(_SCHEDULES) > 64:
            _SCHEDULES.clear()
        trace = step_trace(cfg, layout, work, zero)
        _SCHEDULES[key] = trace, gather_schedule(trace.units, zero)[1]
    return _SCHEDULES[key]


def _zero3_timeline(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    N: int,
    bw: float,
    device: Device,
    peak: float,
) -> _Timeline:
    """One micro step of ZeRO-3 on the two streams of the module docstring."""
    cal = device.calibration
    b, T = work.bytes, work.tokens_per_rank
    trace, issued = _schedule(cfg, layout, work, zero)
    gemm_rate = peak * cal.gemm_efficiency
    attn_rate = peak * (cal.eager_efficiency if work.attention == "eager" else cal.flash_efficiency)
    attn_s = T * _attention_flops(cfg, work) / spec_of(cfg).attention(cfg).layers / attn_rate  # one layer's kernel
    out = _Timeline()
    now = comm_free = 0.0
    ready: dict[str, float] = {}
    bucket, bucket_tensors = 0.0, 0
    lora = by_traced_name(cfg, layout, work.lora) if work.lora is not None else None

    def communicate(numel: float) -> float:
        nonlocal comm_free
        t = _ring(numel, b, N, bw, cal)
        comm_free = max(now, comm_free) + t
        out.comm_s += t
        out.comm_bytes += numel * b * (N - 1) / N
        out.collectives += 1
        return comm_free

    for unit, pass_, gathers in zip(trace.units, trace.passes, issued):
        if gathers.on_demand is not None:
            ready[unit.name] = communicate(unit.numel)
        now = max(now, ready.get(unit.name, 0.0))
        for ahead in gathers.prefetched:
            ready[ahead.name] = communicate(ahead.numel)
        work_s = 2 * _tokens_through(cfg, unit, T) * unit.numel / gemm_rate
        if unit.attention_kernel:
            work_s += attn_s
        work_s *= 2 if pass_ == "backward" else 1
        if lora is not None and pass_ == "backward":  # a frozen weight gets no gradient: one GEMM fewer
            frozen = unit.numel - (lora[unit.name].numel if unit.name in lora else 0)
            work_s -= 2 * _tokens_through(cfg, unit, T) * frozen / gemm_rate
        hooks = cal.hook_s * unit.tensors
        now += work_s + hooks
        out.compute_s += work_s
        out.hooks_s += hooks
        if pass_ == "backward":  # each gradient goes to the reduce bucket; a full bucket is reduce-scattered
            sizes = [unit.numel / unit.tensors] * unit.tensors
            if lora is not None:  # only the adapters' gradients are reduced
                sizes = list(lora[unit.name].sizes) if unit.name in lora else []
            for numel in sizes:
                if bucket_tensors and bucket + numel > zero.reduce_bucket_size:
                    communicate(bucket)
                    bucket, bucket_tensors = 0.0, 0
                bucket, bucket_tensors = bucket + numel, bucket_tensors + 1
    if bucket_tensors:
        communicate(bucket)
    out.time_s = max(now, comm_free)
    return out


_PERIODIC: dict[tuple, bool] = {}


def _periodic(cfg: Any, layout: ExpertLayout, k: int) -> bool:
    """Whether every layer from ``k`` on has the same units (memoised: a comparison of every unit)."""
    layers = model_units(cfg, layout)[1]
    return memo(
        _PERIODIC, (repr(cfg), layout, k), lambda: all(layers[i] == layers[k] for i in range(k + 1, len(layers)))
    )


def _zero3_micro_step(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    N: int,
    bw: float,
    device: Device,
    peak: float,
) -> _Timeline:
    """The timeline of the whole depth, extrapolated from two and three MoE layers when every layer from
    the first MoE one on has the same units (a periodic trace); else the whole trace (e.g. hybrid layers)."""
    L = cfg.num_hidden_layers
    k = next((i for i in range(L) if cfg.is_moe_layer(i)), L)
    if L <= k + 3 or not _periodic(cfg, layout, k):
        return _zero3_timeline(cfg, layout, work, zero, N, bw, device, peak)
    short, longer = (
        _zero3_timeline(cfg.replace(num_hidden_layers=k + d), layout, work, zero, N, bw, device, peak) for d in (2, 3)
    )
    extra = L - k - 3
    whole = _Timeline()
    for f in ("time_s", "compute_s", "comm_s", "hooks_s", "comm_bytes", "collectives"):
        setattr(whole, f, getattr(longer, f) + extra * (getattr(longer, f) - getattr(short, f)))
    return whole


def predict_speed(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    gpus: int,
    nodes: int,
    device: Device,
    grad_accum: int = 1,
    peak_tflops: float | None = None,
) -> SpeedEstimate:
    peak = (peak_tflops or device.peak_tflops) * 1e12
    cal = device.calibration
    b = work.bytes
    model_flops, hw_flops = flops_per_token(cfg, work, layout)
    T = work.tokens_per_rank
    N = gpus
    bw = (device.network_gbps if nodes > 1 else device.nvlink_gbps) * 1e9
    embed, layers, head = model_units(cfg, layout)
    P = sum(u.numel for u in [embed, *(u for layer in layers for u in layer), *head])
    if work.lora is not None:  # only the adapters are reduced and stepped
        P = adapters(cfg, layout, work.lora).numel

    if zero.stage >= 3:
        t = _zero3_micro_step(cfg, layout, work, zero, N, bw, device, peak)
    else:
        t = _Timeline()
        t.compute_s = T * hw_flops / (peak * cal.gemm_efficiency)
        if zero.stage == 2:  # reduce-scatter each micro step; weights all-gathered after the update
            t.comm_bytes = P * b * (N - 1) / N * (1 + 1 / grad_accum)
            t.collectives = math.ceil(P / zero.reduce_bucket_size) * 2
        else:  # all-reduce (= reduce-scatter + all-gather) each micro step
            t.comm_bytes = 2 * P * b * (N - 1) / N
            t.collectives = math.ceil(P / zero.reduce_bucket_size)
        t.comm_s = t.comm_bytes / bw + t.collectives * (N - 1) * cal.ring_step_latency_s
        t.time_s = max(t.compute_s, t.comm_s)  # gradient buckets reduce behind the backward
    if work.sp > 1:  # Ulysses: q, k, v and the output re-sharded (all-to-all) in every layer and pass
        passes = 3 if work.activation_checkpointing else 2
        attention = spec_of(cfg).attention(cfg)
        per_token = attention.exchanged_per_token * b
        a2a_bytes = passes * attention.layers * T * per_token * (work.sp - 1) / work.sp
        a2a_n = passes * attention.layers * 4
        a2a = a2a_bytes / bw + a2a_n * (work.sp - 1) * cal.ring_step_latency_s
        t.comm_s, t.comm_bytes, t.collectives = t.comm_s + a2a, t.comm_bytes + a2a_bytes, t.collectives + a2a_n
        t.time_s += a2a  # on the critical path: attention waits for its heads
    exposed = max(t.time_s - t.compute_s - t.hooks_s, 0.0)

    partition = P / N if zero.stage >= 1 else P
    if zero.offload_optimizer:
        optimizer = partition / CPU_ADAM_PARAMS_PER_S + partition * (b + 4) / (PCIE_GBPS * 1e9)
    else:
        optimizer = partition * ADAM_BYTES_PER_PARAM / (device.hbm_gbps * 1e9)

    micro = t.compute_s + exposed + t.hooks_s
    step = grad_accum * micro + optimizer
    tgs = grad_accum * T / step
    return SpeedEstimate(
        model_flops_per_token=model_flops,
        hardware_flops_per_token=hw_flops,
        compute_s=t.compute_s,
        comm_s=t.comm_s,
        exposed_comm_s=exposed,
        hooks_s=t.hooks_s,
        comm_bytes=t.comm_bytes,
        collectives=round(t.collectives),
        optimizer_s=optimizer,
        step_s=step,
        tgs=tgs,
        mfu=tgs * model_flops / peak,
    )
