"""Start-up: process group, work dir and its lease, resume point, model config, data, DeepSpeed
engine, each checked before anything in the work dir changes; the result is a `Job`."""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Any

import torch

from moe_train.checkpoint.adapters import base_reference
from moe_train.checkpoint.hf_layout import check_checkpoint, read_config
from moe_train.checkpoint.training_state import CheckpointManager, TrainingCheckpoint
from moe_train.engine import kernels
from moe_train.engine import resume as resuming
from moe_train.engine.lease import Lease, NoLease, own_work_dir
from moe_train.engine.loaders import Data, build_data
from moe_train.engine.log import log
from moe_train.engine.model import build_engine
from moe_train.engine.preemption import DEFAULT_GRACE_S
from moe_train.engine.tracking import check_report_to
from moe_train.engine.work_dir import check_outlives_pod, check_shared
from moe_train.models import spec_for
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.lora import LoraConfig
from moe_train.parallel import zero3
from moe_train.parallel.dims import ParallelDims
from moe_train.recipes import Recipe
from moe_train.run_dir import RunDir
from moe_train.storage import probe, redact


@dataclass(kw_only=True)
class TrainConfig:
    """A training job: the recipe, and how and where it runs."""

    recipe: Recipe
    work_dir: str
    launcher: str = "none"
    resume: str | None = None
    peak_tflops: float | None = None
    export: bool = True
    merge: bool = False  # LoRA: also export the base with the adapters merged in (a full HF checkpoint)
    preempt_grace: float = DEFAULT_GRACE_S  # seconds between a stop signal and SIGKILL
    progress: bool = True
    overwrite: bool = False  # move an earlier run in the work dir aside (engine/lease.py)
    allow_batch_change: bool = False  # resume with another global batch (packs per step) than the checkpoint's
    data_cache: str | None = None  # local directory of the tokenized data; None: RunDir.data_cache_dir's


@dataclass(kw_only=True)
class Job:
    """What the loop needs, built once by `setup`."""

    tc: TrainConfig
    run: RunDir
    lease: Lease | NoLease  # rank 0 owns the work dir until the run ends
    ckpt: CheckpointManager
    rank: int
    world: int
    device: torch.device
    cfg: Any  # the model family's config
    layout: ExpertLayout  # how the routed experts are stored (kept out of the config)
    dims: ParallelDims  # the parallel layout: sizes, ranks, process groups
    lora: LoraConfig | None  # the adapters trained on a frozen base; None: full fine-tuning
    base: dict[str, Any] | None  # LoRA: the frozen base's URL and fingerprint, checked on resume
    engine: Any
    scheduler: Any
    data: Data
    fingerprint: dict[str, Any]  # of the training data, checked on resume
    step: int = 0  # where the loop starts: the resumed step, or 0
    total_steps: int

    @property
    def recipe(self) -> Recipe:
        return self.tc.recipe


def setup(tc: TrainConfig) -> Job:
    """Process group, data, model (partitioned from the start), DeepSpeed engine, resume."""
    from moe_train.engine.deepspeed_config import load_deepspeed_config
    from moe_train.engine.distributed import init_distributed

    r = tc.recipe
    ds_config = load_deepspeed_config(r.deepspeed)  # bad configs fail before any process group
    if r.lora_rank and tc.merge and r.ep > 1:
        raise ValueError(
            f"--merge with --ep {r.ep} is not supported (each rank holds 1/{r.ep} of the experts); drop "
            "--merge (the PEFT adapter is exported), or resume the run's last checkpoint with --ep 1 --merge"
        )
    check_report_to(r.report_to)  # a tracker's package missing: one line, before any process group
    info = init_distributed(tc.launcher)
    dims = ParallelDims(info.world_size, r.sp, r.ep, info.rank, r.hold_experts)  # validated once the model is known
    torch.manual_seed(r.seed)

    run = RunDir(tc.work_dir)
    run.check_writable()
    check_outlives_pod(run)
    check_shared(run, info.rank, info.world_size)
    lease = own_work_dir(run, info.rank, tc.resume, tc.overwrite, log=lambda m: log(info.rank, m))
    # torchrun SIGTERMs the ranks when another rank failed: rank 0 then still releases the lease.
    old = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _setup_owned(tc, info=info, ds_config=ds_config, dims=dims, run=run, lease=lease)
    except BaseException:
        lease.release(wrote=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds start-up, so its cleanup (the lease's release) runs


def _setup_owned(
    tc: TrainConfig, *, info: Any, ds_config: dict[str, Any], dims: ParallelDims, run: RunDir, lease: Lease | NoLease
) -> Job:
    """The rest of `setup`, once this job owns the work dir (so removing stale files is safe)."""
    r = tc.recipe
    rank, world, device = info.rank, info.world_size, info.device
    # bf16 also on CPU when the recipe asks (DeepSpeed's bf16 ZeRO-3 runs on gloo): the GPU's dtype logic,
    # testable here.
    dtype = torch.bfloat16 if r.dtype == "bf16" else torch.float32
    ckpt = CheckpointManager(run, rank, r.save_total_limit)
    # Rank 0 picks the resume point and broadcasts it; every rank verifies the files it names.
    resume = ckpt.resolve(tc.resume, log=lambda msg: log(rank, msg.removeprefix("[moe-train] ")))
    if resume is None and tc.resume == "auto":
        refuse_finished_without_checkpoint(run)
    if resume is not None:
        r = resuming.plan(resume, r, dims, tc.allow_batch_change, lambda msg: log(rank, msg))
        tc = dataclasses.replace(tc, recipe=r)

    for url, what in [(r.model, "--model"), (r.tokenizer, "--tokenizer")]:
        if url:
            probe(url, what)
    layout = ExpertLayout(r.moe_implementation, r.expert_in_one_shard)
    lora = lora_config(r)
    cfg = read_config(r.model) if r.model else spec_for(r.family).named_config(r.model_size)
    dims.validate(cfg, layout, ds_config)  # the planner's check too
    if r.model and (resume is None or lora):  # a LoRA resume reads the frozen base from the model too
        check_checkpoint(cfg, r.model)  # every header against the config, before anything is allocated
    base = None if lora is None else base_reference(r.model, r.model_size, r.family, r.seed)
    found = kernels.kernels(cfg, layout, dtype, device)
    log(rank, found.line())
    warning = kernels.check(found, r.require_fast_kernels)  # raises for slow GPU kernels when required
    if warning:
        log(rank, warning)
    dims.create_groups()
    # checks the tokenizer against the model (check_tokenizer)
    data = build_data(r, dims, cfg, run.data_cache_dir(tc.data_cache))
    fingerprint = resuming.data_fingerprint(data.loader.packs)
    if resume is not None:
        resuming.check_model_and_data(resume, cfg, fingerprint)
        resuming.check_lora(resume, lora, base)
    # The LR schedule spans all epochs; --max-steps only stops early, so a run cut short and
    # resumed follows exactly the schedule of an uninterrupted one.
    schedule_steps = data.steps_per_epoch * r.epochs
    total_steps = min(r.max_steps or schedule_steps, schedule_steps)
    # A LoRA checkpoint holds the adapters only: the frozen base always comes from the model.
    engine, scheduler = build_engine(
        r, cfg, layout, dims, ds_config, dtype, device, schedule_steps, lora, load_weights=resume is None or bool(lora)
    )
    if dims.hold_experts:  # what the operator pays for it, said once
        group = world // dims.ep
        held = zero3.whole_bytes(engine.module)
        size = f"{held / 2**30:.2f} GiB" if held >= 2**30 else f"{held / 2**20:.1f} MiB"
        how = f"one all-gather per layer and step over {group} ranks" if group > 1 else "a view: their group is 1 rank"
        log(
            rank,
            f"--hold-experts: each rank's routed experts stay gathered from their forward to the optimizer step, "
            f"{size} per rank ({how})",
        )
    job = Job(
        tc=tc,
        run=run,
        lease=lease,
        ckpt=ckpt,
        rank=rank,
        world=world,
        device=device,
        cfg=cfg,
        layout=layout,
        dims=dims,
        lora=lora,
        base=base,
        engine=engine,
        scheduler=scheduler,
        data=data,
        fingerprint=fingerprint,
        total_steps=total_steps,
    )
    job.step = resume_state(job, resume)
    ckpt.resumed_from = job.step  # stamped on this segment's checkpoints: where its branch starts
    # Only now, with every input checked and the work dir ours: a start that fails changes nothing.
    if rank == 0:
        found = run.run_files() if tc.overwrite else []
        if found:
            log(rank, f"moved the earlier run ({', '.join(found)}) aside to {run.display(run.move_aside(found))}")
        for path in ckpt.remove_incomplete():
            log(rank, f"removed incomplete checkpoint {run.display(path)}")
    return job


def lora_config(r: Recipe) -> LoraConfig | None:
    """The recipe's LoRA, or None (full fine-tuning); impossible combinations refused in one line."""
    if not r.lora_rank:
        return None
    if r.moe_implementation != "shard" and "experts" in r.lora_targets:
        raise ValueError(
            "LoRA on routed experts needs --moe-implementation shard; or leave experts out of --lora-targets"
        )
    return LoraConfig(r.lora_rank, r.lora_alpha, r.lora_dropout, tuple(r.lora_targets))


def refuse_finished_without_checkpoint(run: RunDir) -> None:
    """``--resume auto`` on a run that ended (summary.json) but left no checkpoint would silently start over.
    A run killed before its first save has no summary and starts from scratch, so requeues never crash-loop."""
    if not run.fs.exists(run.summary):
        return
    try:
        steps = run.read_json(run.summary).get("steps", "?")
    except (ValueError, AttributeError):
        steps = "?"
    raise ValueError(
        f"work dir {redact(run.url)} holds a run that ended at step {steps} (summary.json) but no training "
        "checkpoint to resume from (it ran with --save-steps 0?); pass --overwrite to start again (the earlier "
        "run is moved into previous/), or --resume with a checkpoint URL"
    )


def resume_state(job: Job, resume: TrainingCheckpoint | None) -> int:
    """Load the resume point into the engine and loader; the step to continue from (0: a fresh start)."""
    from moe_train.checkpoint.adapters import checkpoint_shapes
    from moe_train.checkpoint.hf_layout import parameter_shapes

    if not resume:
        return 0
    if job.lora is None:
        shapes = parameter_shapes(job.engine.module)
    else:  # a LoRA checkpoint holds the adapters, a routed expert's per expert
        shapes = checkpoint_shapes(job.engine.module, job.lora)
    resume = resuming.load(resume, job, shapes, log=lambda msg: log(job.rank, msg.removeprefix("[moe-train] ")))
    log(job.rank, f"resumed from {resume.where} at step {resume.step}")
    return resume.step
