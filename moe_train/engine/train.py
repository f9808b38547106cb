"""The training loop: DeepSpeed ZeRO under torchrun/srun, packed data, exact token-weighted loss.

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

import dataclasses
import json
import math
import posixpath
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_train.checkpoint.hf_layout import TOKENIZER_FILES, copy_files, read_config
from moe_train.checkpoint.training_state import CheckpointManager, rng_state, set_rng_state
from moe_train.engine.preemption import DEFAULT_GRACE_S, StopFlag
from moe_train.engine.metrics import MetricsWriter, expert_load_stats, peak_memory_gb, peak_tflops, step_flops
from moe_train.models import spec_for, spec_of
from moe_train.models.common.loss import cross_entropy, shift_labels
from moe_train.parallel import expert, zero3
from moe_train.recipes import Recipe
from moe_train.storage import is_local, resolve


@dataclass
class TrainConfig:
    recipe: Recipe
    work_dir: str
    deepspeed: str | None = None  # None: the recipe's
    launcher: str = "none"
    resume: str | None = None
    peak_tflops: float | None = None
    export: bool = True
    preempt_grace: float = DEFAULT_GRACE_S  # seconds between a stop signal and SIGKILL
    progress: bool = True


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[moe-train] {msg}", flush=True)


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def check_work_dir(url: str, rank: int) -> Any:
    """Fail early, on every rank, if the work dir cannot be written."""
    fs, root = resolve(url)
    probe = posixpath.join(root, f".write-probe-{rank}")
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "w") as f:
            f.write("ok")
        fs.rm(probe)
    except (OSError, PermissionError) as e:
        raise ValueError(f"work dir {url} is not writable ({type(e).__name__}: {e}); "
                         "pass a writable --work-dir") from None
    return fs, root


def local_tokenizer_dir(recipe: Recipe, model_url: str | None) -> str:
    """A local directory with the tokenizer files (AutoTokenizer cannot read object stores)."""
    src = recipe.tokenizer or model_url
    if src is None:
        raise ValueError(f"recipe {recipe.name} names no tokenizer or model; pass --model PATH|URL")
    fs, root = resolve(src)
    if not fs.exists(posixpath.join(root, "tokenizer.json")) and not fs.exists(posixpath.join(root, "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer (tokenizer.json) in {src}; put the tokenizer files next to the "
                                "model or set the recipe's tokenizer")
    if is_local(fs):
        return root
    tmp = tempfile.mkdtemp(prefix="moe-train-tokenizer-")
    copy_files(src, *resolve(tmp), TOKENIZER_FILES)
    return tmp


def build_model(cfg: Any, ds_config: dict[str, Any], dtype: torch.dtype, device: torch.device,
                model_url: str | None, seed: int, activation_checkpointing: bool,
                ep: expert.EPGroups | None = None) -> torch.nn.Module:
    """The model partitioned from the start (ZeRO-3), its partitions filled from the source; with
    ``ep``, each rank's routed experts are its EP rank's (``moe_train/parallel/expert.py``)."""
    from moe_train.checkpoint.hf_layout import load_into
    from moe_train.engine.weights import open_source

    spec = spec_of(cfg)
    if ep is None:
        model = zero3.build(lambda: spec.build(cfg), ds_config, dtype, device)
    else:
        model = zero3.build(lambda: expert.apply(spec.build(cfg), spec.moe_types, ep), ds_config, dtype, device)
    load_into(model, open_source(model, model_url, seed), partition=zero3.partition)
    if activation_checkpointing:
        zero3.apply_activation_checkpointing(spec.layers(model))
    return model


@dataclass
class Job:
    """What the loop needs, built once by `setup`."""

    tc: TrainConfig
    rank: int
    world: int
    device: torch.device
    cfg: Any  # the model family's config
    engine: Any
    scheduler: Any
    loader: Any
    seq: Any  # SequenceParallel, or None for --sp 1
    ckpt: CheckpointManager
    fs: Any
    work_root: str
    tokenizer_dir: str
    step: int
    total_steps: int
    ep: Any = None  # expert.EPGroups for --ep N > 1

    @property
    def recipe(self) -> Recipe:
        return self.tc.recipe


@dataclass
class Data:
    loader: Any
    tokenizer_dir: str
    pad_id: int
    steps_per_epoch: int


def build_data(r: Recipe, rank: int, world: int) -> Data:
    """Tokenizer, packed dataset and this rank's loader."""
    from transformers import AutoTokenizer

    from moe_train.data import PackedLoader, build_packed_dataset

    tokenizer_dir = local_tokenizer_dir(r, r.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not r.data:
        raise ValueError(f"recipe {r.name} has no data; pass --data PATH|URL (alpaca JSON/JSONL or messages JSONL)")
    packs, stats = build_packed_dataset(r.data, tokenizer, r.template, r.max_length, r.varlen, r.too_long, r.seed)
    _log(rank, f"data: {stats}")
    pad_id = tokenizer.pad_token_id or 0
    loader = PackedLoader(packs, dp_rank=rank // r.sp, dp_size=world // r.sp, seed=r.seed, shuffle=r.shuffle,
                          micro_batch_size=r.micro_batch_size, pad_id=pad_id)
    steps_per_epoch = len(loader) // r.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} micro-batches per rank are fewer than grad_accum={r.grad_accum}; "
                         "lower grad_accum or add data")
    return Data(loader, tokenizer_dir, pad_id, steps_per_epoch)


def build_engine(r: Recipe, cfg: Any, ds_config: dict[str, Any], dtype: torch.dtype,
                 device: torch.device, world: int, schedule_steps: int,
                 ep: expert.EPGroups | None = None) -> tuple[Any, Any]:
    """The partitioned model, AdamW and the cosine schedule inside a DeepSpeed engine."""
    from moe_train.engine.deepspeed_config import fill_auto, offloads_optimizer

    ds_config = fill_auto(ds_config, micro_batch_size=1, grad_accum=r.grad_accum, world_size=world,
                          grad_clip=r.max_grad_norm, bf16=dtype == torch.bfloat16, hidden_size=cfg.hidden_size)
    model = build_model(cfg, ds_config, dtype, device, r.model, r.seed, r.activation_checkpointing, ep)
    if offloads_optimizer(ds_config):  # the optimizer runs on host memory: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(model.parameters(), lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
                                     adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_steps, r.warmup_ratio, r.min_lr_ratio))
    return zero3.initialize(model, optimizer, scheduler, ds_config)


def resume_state(ckpt: CheckpointManager, resume: tuple[Any, str] | None, engine: Any, loader: Any, rank: int) -> int:
    """Load the resume point into the engine and loader; the step to continue from (0: a fresh start)."""
    if rank == 0:
        for path in ckpt.remove_incomplete():
            _log(rank, f"removed incomplete checkpoint {path}")
    dist.barrier()
    if not resume:
        return 0
    state = ckpt.load(engine, resume)
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    _log(rank, f"resumed from {resume[1]} at step {state['step']}")
    return state["step"]


def setup(tc: TrainConfig) -> Job:
    """Process group, data, model (partitioned from the start), DeepSpeed engine, resume."""
    from moe_train.engine.deepspeed_config import load_deepspeed_config
    from moe_train.engine.distributed import init_distributed
    from moe_train.parallel import SequenceParallel

    r = tc.recipe
    ds_config = load_deepspeed_config(tc.deepspeed or r.deepspeed)  # bad configs fail before any process group
    info = init_distributed(tc.launcher)
    rank, world, device = info.rank, info.world_size, info.device
    dtype = torch.bfloat16 if device.type == "cuda" and r.dtype == "bf16" else torch.float32
    # Groups of r.sp consecutive ranks share each packed row (raises if r.sp does not divide the world).
    seq = SequenceParallel(r.sp) if r.sp != 1 else None
    torch.manual_seed(r.seed)

    fs, work_root = check_work_dir(tc.work_dir, rank)
    ckpt = CheckpointManager(tc.work_dir, rank, r.save_total_limit)
    resume = ckpt.resolve(tc.resume)

    layout = dict(moe_implementation=r.moe_implementation, expert_in_one_shard=r.expert_in_one_shard)
    cfg = read_config(r.model, **layout) if r.model else spec_for(r.family).named_config(r.model_size, **layout)
    expert.check(r.ep, world, cfg, ds_config, r.sp)
    ep = expert.create_groups(r.ep) if r.ep != 1 else None
    data = build_data(r, rank, world)
    # The LR schedule spans all epochs; --max-steps only stops early, so a run cut short and
    # resumed follows exactly the schedule of an uninterrupted one.
    schedule_steps = data.steps_per_epoch * r.epochs
    total_steps = min(r.max_steps or schedule_steps, schedule_steps)
    engine, scheduler = build_engine(r, cfg, ds_config, dtype, device, world, schedule_steps, ep)
    if seq is not None:
        seq.apply(engine.module, spec_of(cfg))
    step = resume_state(ckpt, resume, engine, data.loader, rank)
    return Job(tc, rank, world, device, cfg, engine, scheduler, data.loader, seq, ckpt, fs, work_root,
               data.tokenizer_dir, step, total_steps, ep)


def run_step(job: Job, micro: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimiser step over `grad_accum` micro-batches; returns the step's global figures."""
    r, engine, device, seq = job.recipe, job.engine, job.device, job.seq
    t0 = time.perf_counter()
    counts = torch.tensor([float(sum(b["num_loss_tokens"] for b in micro)),
                           float(sum(b["input_ids"].numel() for b in micro))])
    dist.all_reduce(counts)
    counts /= r.sp  # the ranks of a sequence-parallel group hold the same rows
    global_tokens = max(counts[0].item(), 1.0)
    ce_total, aux_total = torch.zeros((), device=device), torch.zeros((), device=device)
    load = None
    lengths: list[int] = []
    for b in micro:
        if seq is not None:  # this rank's slice of the row, with its targets and samples
            b = seq.shard(b, job.loader.pad_id)
        segment_ids = b.get("segment_ids")
        out = engine(b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                     cu_seqlens=b["cu_seqlens"].to(device), max_seqlen=b["max_seqlen"],
                     segment_ids=None if segment_ids is None else segment_ids.to(device))
        targets = b["targets"] if "targets" in b else shift_labels(b["labels"])
        ce_sum = cross_entropy(out.logits, targets.to(device), reduction="sum")
        loss = ce_sum * (job.world * r.grad_accum / global_tokens)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            aux_total += out.aux_loss.detach().float() / r.grad_accum
        engine.backward(loss)
        engine.step()
        ce_total += ce_sum.detach().float()  # on the device: no host sync per micro-batch
        load = out.expert_load if load is None else load + out.expert_load
        cu = b["cu_seqlens"].tolist()
        lengths += [e - s for s, e in zip(cu[:-1], cu[1:])]
    reduced = torch.stack([ce_total, aux_total])
    dist.all_reduce(reduced)
    if load is not None:
        dist.all_reduce(load)
        load = load.cpu()
    reduced = reduced.cpu()
    return {"loss": reduced[0].item() / global_tokens, "aux_loss": reduced[1].item() / job.world,
            "tokens": counts[1].item(), "loss_tokens": global_tokens, "expert_load": load, "lengths": lengths,
            "seconds": time.perf_counter() - t0}


def step_record(job: Job, step: int, s: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """The metrics.jsonl line of one step (see moe_train/engine/metrics.py for the FLOP count)."""
    dt, world = s["seconds"], job.world
    flops = step_flops(job.cfg, s["lengths"]) * (world // job.recipe.sp)  # every group ran a similar mix
    norm = job.engine.get_global_grad_norm()
    return {
        "step": step, "loss": round(s["loss"], 6), "aux_loss": round(s["aux_loss"], 8),
        "lr": job.scheduler.get_last_lr()[0], "grad_norm": None if norm is None else round(float(norm), 6),
        "tgs": round(s["tokens"] / dt / world, 2), "tflops_per_gpu": round(flops / dt / world / 1e12, 6),
        "mfu": round(flops / dt / world / (peak * 1e12), 4) if peak else None,
        "tokens": int(s["tokens"]), "loss_tokens": int(s["loss_tokens"]), "step_time": round(dt, 4),
        "peak_mem_gb": round(peak_memory_gb(), 3), "epoch": job.loader.epoch,
        "expert_load": expert_load_stats(s["expert_load"]) if s["expert_load"] is not None else [],
    }


def export(job: Job, step: int) -> dict[str, Any]:
    """Stream the trained model into `{work_dir}/hf_model`; reports the writer's peak memory."""
    from moe_train.checkpoint.hf_layout import save_pretrained
    from moe_train.engine.memory import PeakRSS

    url = posixpath.join(job.tc.work_dir.rstrip("/"), "hf_model")
    module = job.engine.module
    t0 = time.perf_counter()
    if job.ep is None:
        tensors, dtype = zero3.gathered_parameters(module), None
    else:  # each expert from its owner; one dtype for the experts this rank does not hold
        tensors, dtype = expert.gathered_parameters(module, job.ep), next(module.parameters()).dtype
    with PeakRSS() as rss:
        save_pretrained(module, url, tensors=tensors, is_writer=job.rank == 0, dtype=dtype,
                        tokenizer_dir=job.tokenizer_dir, extra={"step": step, "recipe": job.recipe.name})
    dist.barrier()  # the export is complete (COMPLETE written) before any rank moves on
    model_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())
    if job.ep is not None:  # this rank holds E/N of the routed experts: size the whole model
        from moe_train.checkpoint.hf_layout import reference_shapes

        model_bytes = sum(map(math.prod, reference_shapes(module).values())) * next(module.parameters()).element_size()
    out = {"hf_model": url, "export_seconds": time.perf_counter() - t0,
           "export_peak_rss_delta_mb": rss.peak_delta / 2**20, "model_mb": model_bytes / 2**20}
    _log(job.rank, f"exported HF checkpoint to {url} in {out['export_seconds']:.1f}s; writer peak RSS "
                   f"+{out['export_peak_rss_delta_mb']:.1f} MiB for a {out['model_mb']:.1f} MiB model")
    return out


def train(tc: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns a summary (losses, tokens/s, paths)."""
    # DeepSpeed calls c10d functions that torch deprecates, once per collective.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    job = setup(tc)
    r, rank = job.recipe, job.rank
    metrics = None
    if rank == 0:
        local = is_local(job.fs)
        metrics = MetricsWriter(job.fs, posixpath.join(job.work_root, "metrics.jsonl"),
                                posixpath.join(job.work_root, "tb") if local else None)
    peak = peak_tflops(tc.peak_tflops)

    def micro_batches():
        while True:
            yield from job.loader

    batches = micro_batches()
    step, losses, tgs = job.step, [], []
    bar = None
    if rank == 0 and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=job.total_steps, initial=step, desc="train", dynamic_ncols=True)
    job.engine.train()
    try:
        with StopFlag(tc.preempt_grace) as stop:
            while step < job.total_steps:
                result = run_step(job, [next(batches) for _ in range(r.grad_accum)])
                step += 1
                losses.append(result["loss"])
                tgs.append(result["tokens"] / result["seconds"] / job.world)
                if metrics is not None:
                    metrics.write(step_record(job, step, result, peak))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result['loss']:.4f}", tgs=f"{tgs[-1]:.0f}")
                stop_now = stop.agreed()
                if (r.save_steps and step % r.save_steps == 0) or stop_now:
                    path = job.ckpt.save(job.engine, step, {"step": step, "loader": job.loader.state_dict(),
                                                            "rng": rng_state(), "recipe": dataclasses.asdict(r)})
                    _log(rank, f"saved checkpoint {path}")
                if stop_now:
                    raise stop.requested(step)
    finally:
        if bar is not None:
            bar.close()

    summary: dict[str, Any] = {"steps": step, "losses": losses, "tgs": tgs, "work_dir": tc.work_dir}
    if tc.export:
        summary.update(export(job, step))
        if metrics is not None:
            metrics.write({"step": step, "event": "export", "hf_model": summary["hf_model"],
                           "export_peak_rss_delta_mb": round(summary["export_peak_rss_delta_mb"], 2),
                           "model_mb": round(summary["model_mb"], 2)})
    if metrics is not None:
        metrics.close()
        with job.fs.open(posixpath.join(job.work_root, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    job.ckpt.close()
    return summary
