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
import logging
import math
import os
import posixpath
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_train.checkpoint.hf_layout import TOKENIZER_FILES, check_checkpoint, copy_files, read_config
from moe_train.checkpoint.training_state import CheckpointManager, TrainingCheckpoint
from moe_train.engine import kernels
from moe_train.engine.divergence import Diverged, DivergenceGuard, finite_or_none
from moe_train.engine.lease import own_work_dir
from moe_train.engine.metrics import (
    MetricsWriter,
    expert_load_stats,
    peak_memory_gb,
    peak_tflops,
    read_metrics,
    step_flops,
    summarize,
)
from moe_train.engine.preemption import DEFAULT_GRACE_S, StopFlag, catch_early_warning
from moe_train.engine.work_dir import check_outlives_pod, check_shared
from moe_train.models import spec_for, spec_of
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.loss import shift_labels
from moe_train.parallel import zero3
from moe_train.parallel.dims import ParallelDims
from moe_train.parallel.distribute import distributed_model, gathered_parameters
from moe_train.recipes import Recipe
from moe_train.storage import display, is_local, probe, redact, redact_all, resolve, stall_notice


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
    overwrite: bool = False  # move an earlier run in the work dir aside (engine/lease.py)
    allow_batch_change: bool = False  # resume with another global batch (packs per step) than the checkpoint's
    data_cache: str | None = None  # local directory of the tokenized data; None: see data_cache_dir


def _log(rank: int, msg: str) -> None:
    """One line from rank 0 (every rank would say the same), above the progress bar if there is one."""
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"[moe-train] {redact(msg)}", file=sys.stdout)
        sys.stdout.flush()


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


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.addFilter(_UNSEEN_OUTPUT)  # once: a filter already there is not added again


def check_work_dir(url: str, rank: int) -> Any:
    """Fail early, on every rank, if the work dir cannot be written."""
    fs, root = resolve(url)
    probe = posixpath.join(root, f".write-probe-{socket.gethostname()}-{os.getpid()}")  # never another run's
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "w") as f:
            f.write("ok")
        fs.rm(probe)
    except (OSError, PermissionError) as e:
        raise ValueError(
            f"work dir {url} is not writable ({type(e).__name__}: {e}); pass a writable --work-dir"
        ) from None
    return fs, root


def data_cache_dir(explicit: str | None, fs: Any, work_root: str) -> str:
    """Where the tokenized data is cached: ``--data-cache``, else ``WORK_DIR/data_cache`` for a work dir on
    a file system, else local disk (an object cannot be memory-mapped): ``~/.cache/moe-train/data``."""
    if explicit:
        return explicit
    if is_local(fs):
        return posixpath.join(work_root, "data_cache")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe-train", "data")


def refuse_finished_without_checkpoint(fs: Any, root: str, url: str) -> None:
    """``--resume auto`` on a run that ended (summary.json) but left no checkpoint would silently start over.
    A run killed before its first save has no summary and starts from scratch, so requeues never crash-loop."""
    summary = posixpath.join(root, "summary.json")
    if not fs.exists(summary):
        return
    try:
        steps = json.loads(fs.cat_file(summary)).get("steps", "?")
    except (ValueError, AttributeError):
        steps = "?"
    raise ValueError(
        f"work dir {redact(url)} holds a run that ended at step {steps} (summary.json) but no training "
        "checkpoint to resume from (it ran with --save-steps 0?); pass --overwrite to start again (the earlier "
        "run is moved into previous/), or --resume with a checkpoint URL"
    )


def local_tokenizer_dir(recipe: Recipe, model_url: str | None) -> str:
    """A local directory with the tokenizer files (AutoTokenizer cannot read object stores).

    The tokenizer is the recipe's ``tokenizer`` (``--tokenizer``); the CLI clears it when ``--model``
    is given without ``--tokenizer``, so a model brings its own tokenizer."""
    src = recipe.tokenizer or model_url
    if src is None:
        raise ValueError(
            f"recipe {recipe.name} names no tokenizer or model; pass --model PATH|URL or --tokenizer PATH|URL"
        )
    fs, root = resolve(src)
    if not fs.exists(posixpath.join(root, "tokenizer.json")) and not fs.exists(posixpath.join(root, "tokenizer.model")):
        raise FileNotFoundError(
            f"no tokenizer (tokenizer.json or tokenizer.model) in {redact(src)}; put the "
            "tokenizer files next to the model or pass --tokenizer PATH|URL"
        )
    if is_local(fs):
        return root
    tmp = tempfile.mkdtemp(prefix="moe-train-tokenizer-")
    copy_files(src, *resolve(tmp), TOKENIZER_FILES)
    return tmp


def check_tokenizer(cfg: Any, tokenizer: Any, source: str) -> None:
    """The tokenizer fits the model: every token id has an embedding row, and the special ids agree
    with config.json (an out-of-vocab or different eos would make `generate` never stop)."""
    where = f"the tokenizer in {redact(source)}"
    fix = "pass the model's own tokenizer with --tokenizer, or fix config.json"
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{where} has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}; {fix}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ours, theirs = getattr(cfg, name), getattr(tokenizer, name)
        if ours is not None and not 0 <= ours < cfg.vocab_size:
            raise ValueError(
                f"config.json {name}={ours} is outside the vocabulary (vocab_size {cfg.vocab_size}); "
                f"set {name} to the tokenizer's id ({theirs})"
            )
        if name != "pad_token_id" and ours is not None and theirs is not None and ours != theirs:
            token = getattr(tokenizer, name.replace("_id", ""))
            raise ValueError(f"config.json {name}={ours} but {where} has {token!r} = {theirs}; {fix}")


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
) -> torch.nn.Module:
    """This rank's part of the model, distributed as ``dims`` says (``moe_train/parallel/distribute.py``),
    its partitions filled from the source (unless a training checkpoint is about to overwrite them)."""
    from moe_train.checkpoint.hf_layout import load_into
    from moe_train.engine.weights import open_source

    def fill(model: torch.nn.Module) -> None:
        load_into(model, open_source(model, model_url, seed), partition=zero3.partition)

    return distributed_model(
        cfg, layout, dims, ds_config, dtype, device, activation_checkpointing, fill if load_weights else None
    )


@dataclass
class Job:
    """What the loop needs, built once by `setup`."""

    tc: TrainConfig
    rank: int
    world: int
    device: torch.device
    cfg: Any  # the model family's config
    layout: ExpertLayout
    dims: ParallelDims  # the parallel layout: sizes, ranks, process groups
    engine: Any
    scheduler: Any
    loader: Any
    ckpt: CheckpointManager
    data_fingerprint: dict[str, Any]
    fs: Any
    work_root: str
    tokenizer_dir: str
    step: int
    total_steps: int
    lease: Any  # engine/lease.py: rank 0 owns the work dir until the run ends
    eval_loader: Any = None  # validation packs (--eval-data / eval_fraction), or None

    @property
    def recipe(self) -> Recipe:
        return self.tc.recipe


@dataclass
class Data:
    loader: Any
    tokenizer_dir: str
    pad_id: int
    steps_per_epoch: int
    eval_loader: Any = None


def build_data(r: Recipe, dims: ParallelDims, cfg: Any = None, cache_dir: str | None = None) -> Data:
    """Tokenizer (checked against ``cfg``), chat template, packed dataset (tokenized once into the cache
    under ``cache_dir`` and memory-mapped; moe_train/data/cache.py) and this rank's loader."""
    from transformers import AutoTokenizer

    from moe_train.data import PackedLoader, build_packed_dataset, resolve_template

    rank = dims.rank
    tokenizer_dir = local_tokenizer_dir(r, r.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if cfg is not None:
        check_tokenizer(cfg, tokenizer, r.tokenizer or r.model)
    _log(rank, f"tokenizer: {redact(r.tokenizer or r.model)} ({len(tokenizer)} tokens)")
    if not r.data:
        raise ValueError(f"recipe {r.name} has no data; pass --data PATH|URL (alpaca JSON/JSONL or messages JSONL)")
    family = (spec_of(cfg) if cfg is not None else spec_for(r.family)).chat_template
    template = resolve_template(r.template, tokenizer, family, redact(r.tokenizer or r.model))
    _log(rank, f"chat template: {template.source}")
    options = dict(
        template=template,
        max_length=r.max_length,
        varlen=r.varlen,
        too_long=r.too_long,
        seed=r.seed,
        data_format=r.data_format,
        columns=r.columns,
        cache_dir=cache_dir,
        tokenizer_dir=tokenizer_dir,
        log=lambda m: _log(rank, m),
    )
    packs, stats = build_packed_dataset(r.data, tokenizer, **options)
    pad_id = tokenizer.pad_token_id or 0
    dp = dims.dp
    eval_packs = None
    if r.eval_data:
        eval_packs, eval_stats = build_packed_dataset(r.eval_data, tokenizer, **options)
        _log(rank, f"eval data: {eval_stats}")
    elif r.eval_fraction > 0:
        if not 0 < r.eval_fraction < 1 or len(packs) < 2:
            raise ValueError(
                f"eval_fraction={r.eval_fraction} must be in (0, 1) with at least 2 packs; "
                "pass --eval-fraction 0.05 or --eval-data PATH"
            )
        held = sorted(
            np.random.default_rng([r.seed, 1])
            .permutation(len(packs))[: max(1, round(r.eval_fraction * len(packs)))]
            .tolist()
        )
        keep = set(held)
        eval_packs = packs.select(held)
        packs = packs.select([i for i in range(len(packs)) if i not in keep])
        _log(rank, f"eval data: {len(eval_packs)} of the packs held out (eval_fraction={r.eval_fraction})")
    eval_loader = None
    if eval_packs:  # every rank runs the same number of eval forwards (dummies where packs run out)
        eval_loader = PackedLoader(
            eval_packs,
            dp_rank=dims.dp_rank,
            dp_size=dp,
            shuffle=False,
            micro_batch_size=r.micro_batch_size,
            pad_id=pad_id,
        )
    loader = PackedLoader(
        packs,
        dp_rank=dims.dp_rank,
        dp_size=dp,
        seed=r.seed,
        shuffle=r.shuffle,
        micro_batch_size=r.micro_batch_size,
        pad_id=pad_id,
        grad_accum=r.grad_accum,
    )
    _log(rank, f"data: {stats}")
    _log(
        rank,
        f"data: {len(packs)} packs, {loader.steps_per_epoch} steps per epoch, {r.grad_accum} micro-batches "
        f"per step on each of {dp} data-parallel ranks ({r.micro_batch_size} packs each); every pack once "
        "per epoch"
        + (
            f", the last step's {loader.dummies_per_epoch} empty pack slots run as dummies"
            if loader.dummies_per_epoch
            else ""
        ),
    )
    # checkpoints and the export copy the tokenizer files as trained: with the chat template used
    return Data(loader, packs.tokenizer_dir, pad_id, loader.steps_per_epoch, eval_loader)


def build_engine(
    r: Recipe,
    cfg: Any,
    layout: ExpertLayout,
    dims: ParallelDims,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    schedule_steps: int,
    load_weights: bool = True,
) -> tuple[Any, Any]:
    """The partitioned model, AdamW and the cosine schedule inside a DeepSpeed engine."""
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
        cfg, layout, dims, ds_config, dtype, device, r.model, r.seed, r.activation_checkpointing, load_weights
    )
    if offloads_optimizer(ds_config):  # the optimizer runs on host memory: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            model.parameters(), lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_steps, r.warmup_ratio, r.min_lr_ratio))
    return zero3.initialize(model, optimizer, scheduler, ds_config)


def resume_state(job: "Job", resume: TrainingCheckpoint | None) -> int:
    """Load the resume point into the engine and loader; the step to continue from (0: a fresh start)."""
    from moe_train.checkpoint.hf_layout import parameter_shapes
    from moe_train.engine import resume as resuming

    if not resume:
        return 0
    shapes = parameter_shapes(job.engine.module)
    resume = resuming.load(resume, job, shapes, log=lambda msg: _log(job.rank, msg.removeprefix("[moe-train] ")))
    _log(job.rank, f"resumed from {resume.where} at step {resume.step}")
    return resume.step


def setup(tc: TrainConfig) -> Job:
    """Process group, data, model (partitioned from the start), DeepSpeed engine, resume."""
    from moe_train.engine.deepspeed_config import load_deepspeed_config
    from moe_train.engine.distributed import init_distributed

    r = tc.recipe
    ds_config = load_deepspeed_config(tc.deepspeed or r.deepspeed)  # bad configs fail before any process group
    info = init_distributed(tc.launcher)
    # bf16 also on CPU when the recipe asks (DeepSpeed's bf16 ZeRO-3 runs on gloo): the GPU's dtype logic,
    # testable here.
    dtype = torch.bfloat16 if r.dtype == "bf16" else torch.float32
    dims = ParallelDims(info.world_size, r.sp, r.ep, info.rank)  # validated once the model is known
    torch.manual_seed(r.seed)

    fs, work_root = check_work_dir(tc.work_dir, info.rank)
    check_outlives_pod(fs, work_root, redact(tc.work_dir))
    check_shared(fs, work_root, redact(tc.work_dir), info.rank, info.world_size)
    lease = own_work_dir(fs, work_root, info.rank, tc.resume, tc.overwrite, log=lambda m: _log(info.rank, m))
    try:
        return _setup_owned(tc, info, ds_config, dtype, dims, fs, work_root, lease)
    except BaseException:
        lease.release()
        raise


def _setup_owned(
    tc: TrainConfig,
    info: Any,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    dims: ParallelDims,
    fs: Any,
    work_root: str,
    lease: Any,
) -> Job:
    """The rest of `setup`, once this job owns the work dir (so removing stale files is safe)."""
    from moe_train.engine import resume as resuming

    r = tc.recipe
    rank, world, device = info.rank, info.world_size, info.device
    ckpt = CheckpointManager(tc.work_dir, rank, r.save_total_limit)
    # Rank 0 picks the resume point and broadcasts it; every rank verifies the files it names.
    resume = ckpt.resolve(tc.resume, log=lambda msg: _log(rank, msg.removeprefix("[moe-train] ")))
    if resume is None and tc.resume == "auto":
        refuse_finished_without_checkpoint(fs, work_root, tc.work_dir)
    if resume is not None:
        r = resuming.plan(
            resume, r, dims, tc.allow_batch_change, lambda msg: _log(rank, msg), tc.deepspeed or r.deepspeed
        )
        tc = dataclasses.replace(tc, recipe=r)

    for url, what in [(r.model, "--model"), (r.tokenizer, "--tokenizer")]:
        if url:
            probe(url, what)
    layout = ExpertLayout(r.moe_implementation, r.expert_in_one_shard)
    cfg = read_config(r.model) if r.model else spec_for(r.family).named_config(r.model_size)
    dims.validate(cfg, layout, ds_config)  # the planner's check too
    if r.model and resume is None:
        check_checkpoint(cfg, r.model)  # every header against the config, before anything is allocated
    found = kernels.kernels(cfg, layout, dtype, device)
    _log(rank, found.line())
    warning = kernels.check(found, r.require_fast_kernels)  # raises for slow GPU kernels when required
    if warning:
        _log(rank, warning)
    dims.create_groups()
    # checks the tokenizer against the model (check_tokenizer)
    data = build_data(r, dims, cfg, data_cache_dir(tc.data_cache, fs, work_root))
    fingerprint = resuming.data_fingerprint(data.loader.packs)
    if resume is not None:
        resuming.check_model_and_data(resume, cfg, fingerprint)
    # The LR schedule spans all epochs; --max-steps only stops early, so a run cut short and
    # resumed follows exactly the schedule of an uninterrupted one.
    schedule_steps = data.steps_per_epoch * r.epochs
    total_steps = min(r.max_steps or schedule_steps, schedule_steps)
    engine, scheduler = build_engine(
        r, cfg, layout, dims, ds_config, dtype, device, schedule_steps, load_weights=resume is None
    )
    job = Job(
        tc,
        rank,
        world,
        device,
        cfg,
        layout,
        dims,
        engine,
        scheduler,
        data.loader,
        ckpt,
        fingerprint,
        fs,
        work_root,
        data.tokenizer_dir,
        0,
        total_steps,
        lease,
        data.eval_loader,
    )
    job.step = resume_state(job, resume)
    # Only now, with every input checked and the work dir ours: a start that fails changes nothing.
    if rank == 0:
        for path in ckpt.remove_incomplete():
            _log(rank, f"removed incomplete checkpoint {display(ckpt.fs, path)}")
    return job


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
        b = dims.shard_batch(b, job.loader.pad_id)  # with --sp: this rank's slice of the row, targets, samples
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
    engine, device, dims = job.engine, job.device, job.dims
    t0 = time.perf_counter()
    ce, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    engine.eval()
    with torch.no_grad():
        for b in job.eval_loader:
            b = dims.shard_batch(b, job.eval_loader.pad_id)
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


def write_run_config(job: Job) -> None:
    """The resolved recipe and DeepSpeed config next to the run (URLs redacted), rewritten by each segment."""

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    files = {
        "recipe.json": clean(dataclasses.asdict(job.recipe)),
        "deepspeed.json": clean(getattr(job.engine, "config", None) or {}),
    }
    for name, content in files.items():
        with job.fs.open(posixpath.join(job.work_root, name), "w") as f:
            json.dump(content, f, indent=2, default=str)


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
        "epoch": job.loader.epoch,
        "expert_load": expert_load_stats(s["expert_load"]) if s["expert_load"] is not None else [],
        "dummies": s.get("dummies", 0),
        **s.get("balance", {}),
    }


def export(job: Job, step: int) -> dict[str, Any]:
    """Stream the trained model into `{work_dir}/hf_model`; reports the writer's peak memory."""
    from moe_train.checkpoint.hf_layout import HFCheckpoint, save_pretrained
    from moe_train.engine.memory import PeakRSS

    url = posixpath.join(job.tc.work_dir.rstrip("/"), "hf_model")
    module = job.engine.module
    source = job.recipe.model
    # Keys the family carries untrained (DeepSeek V3's MTP layers) are copied from the source checkpoint.
    carry_from = HFCheckpoint(source) if source and spec_of(job.cfg).carried_key is not None else None
    extra = {"step": step, "recipe": job.recipe.name, **({"source": redact(source)} if source else {})}
    t0 = time.perf_counter()
    tensors = gathered_parameters(module, job.dims)
    # Under EP one dtype for the experts this rank does not hold.
    dtype = None if job.dims.experts is None else next(module.parameters()).dtype
    with PeakRSS() as rss:
        carried = save_pretrained(
            module,
            url,
            tensors=tensors,
            is_writer=job.rank == 0,
            dtype=dtype,
            tokenizer_dir=job.tokenizer_dir,
            extra=extra,
            carry_from=carry_from,
        )
    if carried:
        _log(
            job.rank,
            f"copied {len(carried)} tensors of the MTP layers unchanged (not trained) from "
            f"{redact(source)} into the export",
        )
    dist.barrier()  # the export is complete (COMPLETE written) before any rank moves on
    model_bytes = sum(math.prod(zero3.full_shape(p)) * p.element_size() for p in module.parameters())
    if job.dims.experts is not None:  # this rank holds E/N of the routed experts: size the whole model
        from moe_train.checkpoint.hf_layout import reference_shapes

        model_bytes = sum(map(math.prod, reference_shapes(module).values())) * next(module.parameters()).element_size()
    out = {
        "hf_model": redact(url),
        "export_seconds": time.perf_counter() - t0,
        "export_peak_rss_delta_mb": rss.peak_delta / 2**20,
        "model_mb": model_bytes / 2**20,
    }
    _log(
        job.rank,
        f"exported HF checkpoint to {redact(url)} in {out['export_seconds']:.1f}s; writer peak RSS "
        f"+{out['export_peak_rss_delta_mb']:.1f} MiB for a {out['model_mb']:.1f} MiB model",
    )
    return out


def train(tc: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns a summary (losses, tokens/s, paths)."""
    # DeepSpeed calls c10d functions that torch deprecates, once per collective.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    quiet_deepspeed()
    catch_early_warning()
    job = setup(tc)
    try:
        return _train(job)
    finally:
        job.lease.release()  # rank 0, once every rank is done writing (the last save and export end in barriers)


def _train(job: Job) -> dict[str, Any]:
    from moe_train.engine.resume import checkpoint_state

    tc, r, rank = job.tc, job.recipe, job.rank
    metrics = None
    if rank == 0:
        import deepspeed

        hardware = {
            "world_size": job.world,
            "sp": r.sp,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "device": torch.cuda.get_device_name() if job.device.type == "cuda" else job.device.type,
        }
        metrics = MetricsWriter(job.fs, job.work_root, resumed_from=job.step, log=lambda m: _log(0, m), header=hardware)
        write_run_config(job)
    peak = peak_tflops(tc.peak_tflops)

    def run_eval(at: int) -> None:
        result = evaluate(job)
        _log(rank, f"step {at}: val_loss {result['val_loss']:.4f} over {result['val_tokens']} tokens")
        if metrics is not None:
            metrics.write({"step": at, **result})

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
    guard = DivergenceGuard(job.engine.skipped_steps)
    try:
        with StopFlag(tc.preempt_grace) as stop:
            while step < job.total_steps:
                result = run_step(job, [next(batches) for _ in range(r.grad_accum)])
                step += 1
                losses.append(result["loss"])
                tgs.append(result["tokens"] / result["seconds"] / job.world)
                if metrics is not None:
                    metrics.write(finite_or_none(step_record(job, step, result, peak)))  # no Infinity in the JSON
                try:
                    note = guard.check(
                        step, result["loss"], job.engine.get_global_grad_norm(), job.engine.skipped_steps
                    )
                except Diverged as e:
                    if metrics is not None:
                        metrics.write({"step": step, "event": "diverged", "reason": str(e)})
                        metrics.close()
                    raise
                if note:
                    _log(rank, note)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result['loss']:.4f}", tgs=f"{tgs[-1]:.0f}")
                if job.eval_loader is not None and r.eval_steps and step % r.eval_steps == 0:
                    run_eval(step)
                stop_now = stop.agreed()
                # The run's last step is saved too (max_steps, end of data): no run ends without its state.
                due = step % r.save_steps == 0 or step == job.total_steps if r.save_steps else False
                if (due and guard.healthy) or stop_now:
                    with stall_notice(f"checkpoint of step {step} to {redact(tc.work_dir)}", lambda m: _log(rank, m)):
                        path = job.ckpt.save(
                            step,
                            zero3.optimizer_ranges(job.engine, create_state=True),
                            job.cfg,
                            job.layout,
                            checkpoint_state(job, step),
                            job.tokenizer_dir,
                            job.world,
                        )
                    _log(rank, f"saved checkpoint {display(job.ckpt.fs, path)}")
                if stop_now:
                    raise stop.requested(step)
    finally:
        if bar is not None:
            bar.close()

    if job.eval_loader is not None and not (r.eval_steps and step % r.eval_steps == 0):
        run_eval(step)  # the final model's validation loss
    summary: dict[str, Any] = {"steps": step, "losses": losses, "tgs": tgs, "work_dir": redact(tc.work_dir)}
    if tc.export:
        if not r.save_steps:
            _log(rank, "no training checkpoint (--save-steps 0): the export below is this run's only state")
        with stall_notice(f"export to {redact(tc.work_dir)}/hf_model", lambda m: _log(rank, m)):
            summary.update(redact_all(export(job, step)))
        if metrics is not None:
            metrics.write(
                {
                    "step": step,
                    "event": "export",
                    "hf_model": summary["hf_model"],
                    "export_peak_rss_delta_mb": round(summary["export_peak_rss_delta_mb"], 2),
                    "model_mb": round(summary["model_mb"], 2),
                }
            )
    if metrics is not None:
        metrics.close()
        # The whole run, all segments; `summary["segment_losses"]`: this segment's alone.
        run = {**summary, **summarize(read_metrics(job.fs, job.work_root, segments=True)), "segment_losses": losses}
        with job.fs.open(posixpath.join(job.work_root, "summary.json"), "w") as f:
            json.dump(run, f, indent=2)
    job.ckpt.close()
    return summary
