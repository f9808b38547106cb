"""Expert parallelism (``--ep N``) in the planner: what changes against plain ZeRO-3 (``speed.py``).

- Dense units (attention, router, shared experts, embeddings, norms) are gathered and reduce-scattered
  over the whole world, as in ``predict_speed``.
- Routed-expert units: each rank gathers only its E/N local experts, over its expert-data-parallel
  group of M = gpus/N ranks (ring factor (M-1)/M).  Those groups take one rank per EP group, so with
  EP inside a node they cross the network whenever there is more than one node.
- All-to-all (``parallel/expert.py``: a token goes once to each rank holding any of its experts, and one
  combined row comes back): per MoE layer and pass, T * r token rows (hidden size D) go out and come back,
  r = the other ranks a token reaches, (N-1) * (1 - C(E - E/N, K) / C(E, K)) under balanced (uniform)
  routing, against K * (N-1)/N for one row per assignment; with each row its routing (K weights and K
  ids, fp32).  Over NVLink while N <= GPUs per node, else over the network.  Passes: forward and backward,
  plus the recompute with activation checkpointing; calls per layer: 4 in a forward (sizes, routing,
  rows, combine), 3 in backward.
- Overlap: the step is bounded as ``max(compute, comm)``, every collective taken as overlappable (an
  optimistic bound for the all-to-all, whose rows the experts wait for).  ``comm_hidden_s`` reports the
  part the code hides for certain: the dispatch (routing and rows) travels while the shared experts run
  (forward; their backward in backward), ``min(dispatch, shared experts)`` per layer and pass.  Taking
  the rest of the all-to-all as exposed (a critical-path model) makes EP 2, 4 and 8 tie on the seed's
  cluster instead of EP 8 winning; that change of the planner's answers is left to the planner's owner.
- Memory (``memory.predict_memory(..., ep)``): the partitions are the same bytes per rank (E/N
  experts over M ranks = E/world experts' worth); the expert gather buffer shrinks to local shards;
  the dispatch buffers are the rows a rank receives per MoE layer: T*K*D balanced, N*T*min(K, E/N)*D
  under worst-case skew (dropless), which the verdict assumes.
- Local experts kept whole (``memory.experts_whole``; ``zero3.keep_whole``): over M = 1 rank always,
  gather-free (views of the partition); with ``--hold-experts`` over M > 1 ranks, one coalesced
  all-gather per MoE layer per optimizer step (its first forward) instead of ``gathers`` per micro step,
  for every layer's local experts live until the step (``predict_memory(..., hold)``).  The gradient
  reduce-scatter is the same either way.  ``expert_gathers`` counts both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moe_train.models.common.experts import ExpertLayout
from moe_train.parallel.dims import ParallelDims
from moe_train.plan.memory import (
    Workload,
    ZeroSettings,
    dispatch_rows,
    experts_whole,
    local_unit,
    model_units,
    predict_memory,
)
from moe_train.plan.speed import Device, SpeedEstimate, predict_speed


def _collectives(units: list[Any], bucket: int) -> int:
    """Collectives to move ``units`` in order when consecutive ones are coalesced up to ``bucket`` numel."""
    n, acc = 0, 0
    for u in units:
        acc += u.numel
        if acc >= bucket:
            n, acc = n + 1, 0
    return n + (acc > 0)


@dataclass(frozen=True)
class ExpertGathers:
    """The all-gathers of one rank's own expert shards over its expert-data-parallel group, per optimizer step."""

    bytes: float  # per GPU: what the ring moves in (M-1)/M of each gather
    collectives: int
    whole: bool  # kept whole by ``zero3.keep_whole``: gathered once per step (M > 1) or never (M = 1)


def expert_gathers(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    gpus: int,
    ep: int,
    grad_accum: int = 1,
    hold: bool = False,
) -> ExpertGathers:
    """The local experts' all-gathers of one optimizer step of ``grad_accum`` micro steps.  ZeRO-3 fetches
    each shard at its forward, its backward and its recompute (``gathers`` per micro step, consecutive
    shards coalesced up to the prefetch bucket); kept whole (``memory.experts_whole``), one coalesced
    all-gather per MoE layer per step (``zero3._fetch_whole`` on the layer's experts), or none over one
    rank, whose partition is the weight."""
    M = gpus // ep
    whole = experts_whole(gpus, ep, hold, zero)
    _, layers, _ = model_units(cfg, layout)
    local = [  # per layer, the rank's own shards ZeRO-3 partitions (the persistent ones never move)
        [
            u
            for u in layer
            if u.expert is not None
            and u.numel >= zero.param_persistence_threshold
            and local_unit(u, layout, cfg.num_experts, ep)
        ]
        for layer in layers
    ]
    numel = sum(u.numel for layer in local for u in layer)
    once = numel * work.bytes * (M - 1) / M  # one gather of every local shard, per GPU
    if M == 1 and whole:
        return ExpertGathers(0.0, 0, True)
    if whole:
        return ExpertGathers(once, sum(1 for layer in local if layer), True)
    gathers = 3 if work.activation_checkpointing else 2
    shards = [u for layer in local for u in layer]
    per_pass = _collectives(shards, max(zero.prefetch_bucket_size, 1))
    return ExpertGathers(grad_accum * gathers * once, grad_accum * gathers * per_pass, False)


def dispatch_buffer_bytes(cfg: Any, work: Workload, ep: int) -> dict[str, int]:
    """Bytes of the rows one rank receives for one MoE layer: balanced routing and worst-case skew."""
    return {k: rows * cfg.hidden_size * work.bytes for k, rows in dispatch_rows(cfg, work, ep).items()}


def predict_speed_ep(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    gpus: int,
    nodes: int,
    device: Device,
    ep: int,
    grad_accum: int = 1,
    peak_tflops: float | None = None,
    hold: bool = False,
) -> SpeedEstimate:
    """``predict_speed`` with the routed experts split over EP groups of ``ep`` consecutive ranks; ``hold``:
    ``--hold-experts`` (the local experts gathered once per optimizer step, ``expert_gathers``)."""
    if ep == 1 and not hold:
        return predict_speed(cfg, layout, work, zero, gpus, nodes, device, grad_accum, peak_tflops)
    ParallelDims(gpus, work.sp, ep, hold_experts=hold).validate(cfg, layout, None)  # the trainer's rules
    base = predict_speed(cfg, layout, work, zero, gpus, nodes, device, grad_accum, peak_tflops)
    latency = device.calibration.ring_step_latency_s  # alpha, as the ZeRO-3 model uses it
    b, T = work.bytes, work.tokens_per_rank
    per_node = gpus // nodes
    network, nvlink = device.network_gbps * 1e9, device.nvlink_gbps * 1e9

    embed, layers, head = model_units(cfg, layout)
    units = [
        u
        for u in [embed, *(u for layer in layers for u in layer), *head]
        if u.numel >= zero.param_persistence_threshold
    ]
    dense = [u for u in units if u.expert is None]
    experts = [u for u in units if u.expert is not None]
    local = [u for i, u in enumerate(experts) if i % ep == 0]  # E/N of the shards of every layer
    gathers = 3 if work.activation_checkpointing else 2

    ring_world = (gpus - 1) / gpus
    dense_bytes = (gathers + 1) * sum(u.numel for u in dense) * b * ring_world
    dense_bw = network if nodes > 1 else nvlink
    M = gpus // ep
    reduce_bytes = sum(u.numel for u in experts) / ep * b * (M - 1) / M  # the local experts' gradients
    expert_bw = network if nodes > 1 else nvlink
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    a2a_bw = nvlink if ep <= per_node else network
    rows = T * ranks_reached(cfg, ep)  # rows leaving a rank per MoE layer and direction
    dispatch_bytes = rows * (cfg.hidden_size * b + 2 * cfg.experts_per_token * 4)  # rows and their routing
    dispatch_s = dispatch_bytes / a2a_bw + 2 * (ep - 1) * latency  # one pass: routing and rows
    a2a_bytes = gathers * moe_layers * (dispatch_bytes + rows * cfg.hidden_size * b)  # plus the combine

    n_coll = gathers * _collectives(dense, max(zero.prefetch_bucket_size, 1)) + _collectives(
        dense, zero.reduce_bucket_size
    )
    n_reduce = _collectives(local, zero.reduce_bucket_size)
    n_a2a = moe_layers * (4 * (gathers - 1) + 3)  # forward passes: sizes, routing, rows, combine; backward 3
    every_micro = (  # what every micro step moves: all but the local experts' gathers
        dense_bytes / dense_bw
        + reduce_bytes / expert_bw
        + a2a_bytes / a2a_bw
        + n_coll * (gpus - 1) * latency
        + n_reduce * (M - 1) * latency
        + n_a2a * (ep - 1) * latency
    )
    # The local experts' gathers are counted per optimizer step (``expert_gathers``).  Without holding they
    # are the same in every micro step, overlappable like the rest (DeepSpeed prefetches them on its
    # all-gather stream).  Held, the first micro step of a step gathers them all and the others none, and each
    # layer's gather is waited for in its forward pre-hook before its experts compute, with no prefetch
    # (``zero3._fetch_whole``): it adds to the first micro step instead of overlapping it.  The step is the
    # sum of its micro steps; the per-micro-step figures (comm_s, bytes, collectives, exposed) are their means
    # over the step's grad_accum micro steps.
    g = expert_gathers(cfg, layout, work, zero, gpus, ep, grad_accum, hold)
    gather_s = g.bytes / expert_bw + g.collectives * (M - 1) * latency  # per optimizer step
    serial = gather_s if g.whole else 0.0  # the held gathers, exposed in full
    micro = every_micro + (0.0 if g.whole else gather_s / grad_accum)
    comm = every_micro + gather_s / grad_accum
    # The dispatch that travels while the shared experts run (forward passes against their forward,
    # backward against their backward: twice the GEMMs).  The step's bound stays max(compute,
    # comm), which already treats every collective as overlappable; this term is what the code hides
    # for certain, so a critical-path model can take it off the exposed all-to-all.
    shared_fwd_s = shared_expert_seconds(cfg, T, device, peak_tflops)
    hidden = moe_layers * ((gathers - 1) * min(dispatch_s, shared_fwd_s) + min(dispatch_s, 2 * shared_fwd_s))
    compute = base.compute_s
    step = grad_accum * max(compute, micro) + serial + base.optimizer_s
    exposed = max(0.0, micro - compute) + serial / grad_accum
    tgs = grad_accum * T / step
    peak = (peak_tflops or device.peak_tflops) * 1e12
    return dataclasses.replace(
        base,
        comm_s=comm,
        exposed_comm_s=exposed,  # behind compute, bounded as max(compute, comm) per micro step
        comm_hidden_s=hidden,
        comm_bytes=dense_bytes + reduce_bytes + a2a_bytes + g.bytes / grad_accum,
        collectives=n_coll + n_reduce + n_a2a + round(g.collectives / grad_accum),
        step_s=step,
        tgs=tgs,
        mfu=tgs * base.model_flops_per_token / peak,
    )


def ranks_reached(cfg: Any, ep: int) -> float:
    """Other ranks of an EP group of ``ep`` that one token's K experts reach on average, with uniform
    routing over E experts (E/ep per rank): the rows a token sends in the dispatch (and gets back)."""
    E, K = cfg.num_experts, cfg.experts_per_token
    return (ep - 1) * (1 - math.comb(E - E // ep, K) / math.comb(E, K))


def shared_expert_seconds(cfg: Any, tokens: int, device: Device, peak_tflops: float | None = None) -> float:
    """One forward of one layer's shared experts over ``tokens`` rows (their three GEMMs) at the device's
    GEMM efficiency; 0 without shared experts."""
    shared = getattr(cfg, "n_shared_experts", 0) or 0
    flops = 2 * 3 * cfg.hidden_size * cfg.expert_intermediate_size * shared * tokens
    peak = (peak_tflops or device.peak_tflops) * 1e12
    return flops / (peak * device.calibration.gemm_efficiency)


def _allowed(cfg: Any, layout: ExpertLayout, gpus: int, sp: int, ep: int, ds_config: dict[str, Any] | None) -> bool:
    try:
        ParallelDims(gpus, sp, ep).validate(cfg, layout, ds_config)
    except ValueError:
        return False
    return True


def suggest_ep(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    gpus: int,
    nodes: int,
    device: Device,
    grad_accum: int = 1,
    peak_tflops: float | None = None,
    gpu_mem_gb: float | None = None,
    ds_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The EP degree with the highest predicted TGS among those the trainer accepts (``ParallelDims.validate``,
    with ``ds_config`` when given) and, given ``gpu_mem_gb``, that fit under worst-case skew; ep 1 is always
    estimated.  Returns it and every estimate."""
    options = [
        n
        for n in range(1, gpus + 1)
        if n == 1
        or (
            _allowed(cfg, layout, gpus, work.sp, n, ds_config)
            and (gpu_mem_gb is None or predict_memory(cfg, layout, work, zero, gpus, n).per_gpu_gb <= gpu_mem_gb)
        )
    ]
    estimates = {
        n: predict_speed_ep(cfg, layout, work, zero, gpus, nodes, device, n, grad_accum, peak_tflops) for n in options
    }
    # Ties (compute-bound) go to the degree with the least communication: more headroom.
    best = max(estimates, key=lambda n: (round(estimates[n].tgs, 6), -estimates[n].comm_s))
    hold = hold_option(cfg, layout, work, zero, gpus, nodes, device, best, grad_accum, peak_tflops, gpu_mem_gb)
    return {"ep": best, "estimates": estimates, "hold": hold}


def hold_option(
    cfg: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    gpus: int,
    nodes: int,
    device: Device,
    ep: int,
    grad_accum: int = 1,
    peak_tflops: float | None = None,
    gpu_mem_gb: float | None = None,
) -> dict[str, Any] | None:
    """``--hold-experts`` at ``ep`` against without: its memory, whether it fits (None without ``gpu_mem_gb``),
    its estimate, and whether it helps (fits and a higher TGS).  None where it changes nothing: ep 1 (the
    trainer refuses it) or expert-data-parallel groups of one rank (kept whole anyway, gather-free)."""
    if ep == 1 or gpus == ep:
        return None
    mem = predict_memory(cfg, layout, work, zero, gpus, ep, hold=True)
    est = predict_speed_ep(cfg, layout, work, zero, gpus, nodes, device, ep, grad_accum, peak_tflops, hold=True)
    plain = predict_speed_ep(cfg, layout, work, zero, gpus, nodes, device, ep, grad_accum, peak_tflops)
    fits = None if gpu_mem_gb is None else mem.per_gpu_gb <= gpu_mem_gb
    return {
        "ep": ep,
        "per_gpu_gb": mem.per_gpu_gb,
        "held_gb": mem.phases["loss"].get("held_experts", 0.0) / 2**30,
        "fits": fits,
        "estimate": est,
        "speedup": est.tgs / plain.tgs,
        "helps": fits is not False and est.tgs > plain.tgs,
    }


def _hold_line(hold: dict[str, Any] | None, ep: int) -> str:
    """One line: whether ``--hold-experts`` fits and helps at ``ep`` (``hold_option``)."""
    if hold is None:
        why = "refused at ep 1" if ep == 1 else "always on over groups of one rank (no gathers, no extra memory)"
        return f"  --hold-experts at ep {ep}: {why}"
    faster = hold["speedup"] > 1
    verdict = (
        "helps"
        if hold["helps"]
        else ("faster but " if faster else "no faster, and ") + "does not fit: leave it off"
        if hold["fits"] is False
        else "no faster: leave it off"
    )
    return (
        f"  --hold-experts at ep {ep}: {hold['per_gpu_gb']:.1f} GB ({hold['held_gb']:.1f} GB of local experts kept "
        f"to the optimizer step), TGS {hold['estimate'].tgs:.1f} ({hold['speedup']:.2f}x): {verdict}"
    )


def ep_report(p: Any, ep: int, grad_accum: int, hold: bool = False) -> tuple[str, dict[str, Any]]:
    """The ``moe-train plan --ep N [--hold-experts]`` section (text, JSON) for a ``Plan``: --ep N against
    ZeRO-3, the suggested degree, and whether holding the local experts fits and helps there."""
    ParallelDims(p.gpus, p.work.sp, ep, hold_experts=hold).validate(p.model, p.layout, p.ds_config)  # the trainer's
    args = (p.model, p.layout, p.work, p.zero, p.gpus, p.nodes, p.device)
    est = predict_speed_ep(*args, ep, grad_accum, p.peak_tflops, hold)
    z3 = predict_speed_ep(*args, 1, grad_accum, p.peak_tflops)
    best = suggest_ep(*args, grad_accum, p.peak_tflops, p.gpu_mem_gb, p.ds_config)
    buffers = dispatch_buffer_bytes(p.model, p.work, ep)
    mem = predict_memory(p.model, p.layout, p.work, p.zero, p.gpus, ep, hold)
    fits = mem.per_gpu_gb <= p.gpu_mem_gb
    M = p.gpus // ep
    gathers = {h: expert_gathers(p.model, p.layout, p.work, p.zero, p.gpus, ep, grad_accum, h) for h in (False, True)}
    here = best["hold"] if best["ep"] == ep else hold_option(*args, ep, grad_accum, p.peak_tflops, p.gpu_mem_gb)
    lines = [
        "",
        f"expert parallel --ep {ep}{' --hold-experts' if hold else ''} (estimate; all-to-all over "
        f"{'NVLink' if ep <= p.gpus // p.nodes else 'the network'})",
        f"  memory per GPU: {mem.per_gpu_gb:.1f} GB of {p.gpu_mem_gb:g} GB with worst-case routing skew: "
        + ("fits" if fits else "DOES NOT FIT")
        + f" (ep 1: {p.memory.per_gpu_gb:.1f} GB)",
        f"  per micro step: compute {est.compute_s:.2f} s, communication {est.comm_s:.2f} s "
        f"({est.comm_bytes / 1e9:.0f} GB in {est.collectives} collectives per GPU): {est.bound}-bound",
        f"  TGS {est.tgs:.1f} against {z3.tgs:.1f} with ZeRO-3 alone ({est.tgs / z3.tgs:.2f}x), MFU {est.mfu:.1%}",
        (
            f"  local expert gathers per optimizer step over {M} ranks: "
            + ", ".join(
                f"{'held' if h else 'per use'} {g.bytes / 1e9:.1f} GB in {g.collectives}" for h, g in gathers.items()
            )
            if M > 1
            else "  local expert gathers: none (each expert-data-parallel group is one rank: views of the partition)"
        ),
        _hold_line(here, ep),
        f"  dispatch buffer per MoE layer: {buffers['balanced'] / 2**30:.2f} GB balanced, "
        f"{buffers['worst_case'] / 2**30:.2f} GB worst-case skew (dropless)",
        f"suggested ep: {best['ep']} (fits; TGS {best['estimates'][best['ep']].tgs:.1f}; of "
        + ", ".join(f"{n}: {e.tgs:.0f}" for n, e in best["estimates"].items())
        + ")",
    ]
    if best["ep"] != ep:
        lines.append(_hold_line(best["hold"], best["ep"]))

    def summary(h: dict[str, Any] | None) -> dict[str, Any] | None:
        keys = ("per_gpu_gb", "held_gb", "fits", "speedup", "helps")
        return None if h is None else {**{k: h[k] for k in keys}, "tgs": h["estimate"].tgs}

    data = {
        "ep": ep,
        "hold_experts": hold,
        "tgs": est.tgs,
        "zero3_tgs": z3.tgs,
        "comm_s": est.comm_s,
        "compute_s": est.compute_s,
        "expert_gather_bytes_per_step": gathers[hold].bytes,
        "expert_gathers_per_step": gathers[hold].collectives,
        "dispatch_buffer_bytes": buffers,
        "per_gpu_gb": mem.per_gpu_gb,
        "fits": fits,
        "hold": summary(here),  # --hold-experts at this degree (None: ep 1, or groups of one rank)
        "suggested_ep": best["ep"],
        "suggested_hold": summary(best["hold"]),
    }
    return "\n".join(lines), data
