"""One optimiser step and one validation pass, with exact token-weighted losses.

Loss.  Each optimiser step covers `grad_accum` micro-batches on every data-parallel rank.  The
loss of a step is the mean cross entropy over all its trained tokens, wherever they are:

    loss = sum over micro-batches and ranks of CE_sum / global_tokens

DeepSpeed divides each backward by `grad_accum` and averages gradients over ranks, so each
micro-batch back-propagates CE_sum * dp_size * grad_accum / global_tokens; `global_tokens` is
one all-reduce per step.  The MoE balance loss is added per micro-batch and averaged the same way.

With ``--sp N`` each rank holds a slice of its group's row and CE_sum is the slice's (labels shifted
before the split); token counts are divided by N, the group's ranks all reading the same rows.  The
same formula and DeepSpeed's average over the whole world then stay exact:
``moe_train/parallel/sequence.py`` says why, and keeps the balance loss exact too.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from moe_train.engine.metrics import expert_load_stats, peak_memory_gb, step_flops
from moe_train.engine.setup import Job
from moe_train.models import spec_of
from moe_train.models.common.loss import shift_labels


def forward(engine: Any, b: dict[str, Any], device: torch.device) -> Any:
    """The model on one micro-batch (or this rank's SP slice of it); ``loss`` is the cross-entropy sum
    over the batch's targets, from the chunked LM head: no (T, V) logits are built."""
    segment_ids = b.get("segment_ids")
    targets = b["targets"] if "targets" in b else shift_labels(b["labels"])
    return engine(
        b["input_ids"].to(device),
        position_ids=b["position_ids"].to(device),
        cu_seqlens=b["cu_seqlens"].to(device),
        max_seqlen=b["max_seqlen"],
        segment_ids=None if segment_ids is None else segment_ids.to(device),
        targets=targets.to(device),
    )


def run_step(job: Job, micro: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimiser step over `grad_accum` micro-batches; returns the step's global figures."""
    r, engine, device, dims = job.recipe, job.engine, job.device, job.dims
    t0 = time.perf_counter()
    real = [b.get("num_packs", 1) > 0 for b in micro]  # dummies (the end of an epoch) train nothing
    counts = torch.tensor(
        [
            float(sum(b["num_loss_tokens"] for b in micro)),
            float(sum(b["input_ids"].numel() for b, ok in zip(micro, real) if ok)),
            float(sum(real)),
        ]
    )
    dist.all_reduce(counts)
    counts[:2] /= dims.sp  # the ranks of a sequence-parallel group hold the same rows
    global_tokens = max(counts[0].item(), 1.0)
    # The balance loss is a mean over the step's real micro-batches (DeepSpeed divides by
    # world * grad_accum): 1 unless the last step of an epoch holds dummies.
    aux_scale = job.world * r.grad_accum / max(counts[2].item(), 1.0)
    ce_total, aux_total = torch.zeros((), device=device), torch.zeros((), device=device)
    load = None
    lengths: list[int] = []
    for b, ok in zip(micro, real):
        b = dims.shard_batch(b, job.data.loader.pad_id)  # with --sp: this rank's slice of the row, targets, samples
        out = forward(engine, b, device)
        ce_sum = out.loss
        loss = ce_sum * (job.world * r.grad_accum / global_tokens)
        if out.aux_loss is not None:
            aux = out.aux_loss * (aux_scale if ok else 0.0)  # times 0: the graph (and ZeRO-3's hooks) still run
            loss = loss + aux
            aux_total += aux.detach().float() / (job.world * r.grad_accum)
        engine.backward(loss)
        engine.step()
        ce_total += ce_sum.detach().float()  # on the device: no host sync per micro-batch
        if out.expert_load is not None:
            step_load = out.expert_load if ok else torch.zeros_like(out.expert_load)
            load = step_load if load is None else load + step_load
        if ok:
            cu = b["cu_seqlens"].tolist()
            lengths += [e - s for s, e in zip(cu[:-1], cu[1:])]
    reduced = torch.stack([ce_total, aux_total])
    dist.all_reduce(reduced)
    balance: dict[str, Any] = {}
    if load is not None:
        dist.all_reduce(load)
        after_step = spec_of(job.cfg).after_step
        if after_step is not None:  # e.g. DeepSeek V3's correction bias, from the global load: same on every rank
            balance = after_step(engine.module, load, r.bias_update_rate)
        load = load.cpu()
    reduced = reduced.cpu()
    return {
        "loss": reduced[0].item() / global_tokens,
        "aux_loss": reduced[1].item(),
        "dummies": int(round(job.world * r.grad_accum - counts[2].item())),
        "tokens": counts[1].item(),
        "loss_tokens": global_tokens,
        "expert_load": load,
        "lengths": lengths,
        "seconds": time.perf_counter() - t0,
        "balance": balance,
    }


def evaluate(job: Job) -> dict[str, Any]:
    """Validation loss: cross entropy summed over every eval token on every rank / their count.
    Every rank runs the same forwards (the loader pads with dummies), as ZeRO-3 and SP need."""
    engine, device, dims, loader = job.engine, job.device, job.dims, job.data.eval_loader
    t0 = time.perf_counter()
    ce, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    engine.eval()
    with torch.no_grad():
        for b in loader:
            b = dims.shard_batch(b, loader.pad_id)
            ce += forward(engine, b, device).loss
            tokens += b["num_loss_tokens"]  # after seq.shard: the slice's, so the sum over all ranks is exact
    engine.train()
    reduced = torch.stack([ce.float(), tokens.float()])
    dist.all_reduce(reduced)
    ce_sum, n = reduced.cpu().tolist()
    return {
        "event": "eval",
        "val_loss": round(ce_sum / max(n, 1.0), 6),
        "val_tokens": int(n),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def step_record(job: Job, step: int, s: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """The metrics record of one step (see moe_train/engine/metrics.py for the FLOP count)."""
    dt, world = s["seconds"], job.world
    flops = step_flops(job.cfg, s["lengths"]) * job.dims.dp  # every group ran a similar mix
    norm = job.engine.get_global_grad_norm()
    return {
        "step": step,
        "loss": s["loss"],
        "aux_loss": round(s["aux_loss"], 8),
        "lr": job.scheduler.get_last_lr()[0],
        "grad_norm": None if norm is None else round(float(norm), 6),
        "tgs": round(s["tokens"] / dt / world, 2),
        "tflops_per_gpu": round(flops / dt / world / 1e12, 6),
        "mfu": round(flops / dt / world / (peak * 1e12), 4) if peak else None,
        "tokens": int(s["tokens"]),
        "loss_tokens": int(s["loss_tokens"]),
        "step_time": round(dt, 4),
        "peak_mem_gb": round(peak_memory_gb(), 3),
        "epoch": job.data.loader.epoch,
        "expert_load": expert_load_stats(s["expert_load"]) if s["expert_load"] is not None else [],
        "dummies": s.get("dummies", 0),
        **s.get("balance", {}),
    }
