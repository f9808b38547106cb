"""Resuming a run from a training checkpoint on any topology, and what a checkpoint records.

A checkpoint (``moe_train/checkpoint/training_state.py``) holds the fp32 master weights and Adam
moments by HF key and element range, so the world size, ``--sp``, ``expert_in_one_shard`` and
``shard``/``origin`` may all change on resume.  What must stay is what defines the run:

- the model (every ``config.json`` field) and the data (file list and sizes, and a content hash of
  the packs, which also covers the tokenizer, template, ``max_length`` and packing seed);
- the global batch, in packs per optimiser step (data-parallel ranks x ``grad_accum`` x micro batch):
  on another world size ``grad_accum`` is adjusted to keep it (2 ranks x 2 -> 4 ranks x 1), or the
  resume is refused with one line unless ``--allow-batch-change``;
- the LR schedule's shape (epochs, warm-up, floor) and the data order (seed, shuffle).

The optimiser's settings (lr, betas, weight decay, clipping) and the run's length and save cadence
may change: the new values apply from the resumed step and each change is logged.  The data
position is kept in packs, so a loader on another data-parallel size continues at the same pack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_train.checkpoint.adapters import check_base
from moe_train.checkpoint.hf_layout import persistent_buffers
from moe_train.checkpoint.training_state import (
    FIXED,
    LAYOUT,
    TUNABLE,
    TrainingCheckpoint,
    first_error,
    set_rng_state,
)
from moe_train.models.common.key_map import canonical_name
from moe_train.parallel import zero3
from moe_train.parallel.dims import ParallelDims
from moe_train.recipes import Recipe, recipe_record


def data_fingerprint(packs: Any) -> dict[str, Any]:
    """The training data's inputs (name, size or commit) and a SHA-256 over its packs' digests (the
    cache computed each pack's over its tokens, labels and boundaries when it tokenized them)."""
    return {"files": [i[:2] for i in packs.meta["inputs"]], "packs": len(packs), "sha256": packs.sha256()}


def plan(
    ckpt: TrainingCheckpoint,
    r: Recipe,
    dims: ParallelDims,
    allow_batch_change: bool,
    log: Callable[[str], None],
) -> Recipe:
    """The recipe to resume ``ckpt`` with: refused (one line) if it changes the run, else with
    ``grad_accum`` adjusted to keep the global batch on this world size, every change logged."""
    saved, state, step = ckpt.state["recipe"], ckpt.state, ckpt.step
    now = recipe_record(r)
    for key in FIXED:
        # template None: the tokenizer's or family's, resolved at start-up; the packs' digest covers it
        if saved.get(key) != now[key] and not (key == "template" and now[key] is None):
            raise ValueError(
                f"{key} was {saved[key]!r} in the checkpoint and is {now[key]!r} now; {key} defines the "
                f"run and cannot change on resume: pass --cfg-options {key}={saved[key]!r} or start a "
                "new --work-dir"
            )
    dp, world = dims.dp, dims.world
    packs = state["dp_size"] * state["grad_accum"] * state["micro_batch_size"]
    accum = r.grad_accum
    if dp * accum * r.micro_batch_size != packs and r.grad_accum == saved["grad_accum"]:
        accum = packs / (dp * r.micro_batch_size)  # keep the global batch by accumulating more or less
        if accum == int(accum) and accum >= 1:
            accum = int(accum)
            r = r.replace(grad_accum=accum)
    if dp * r.grad_accum * r.micro_batch_size != packs:
        if not allow_batch_change:
            per = dp * r.micro_batch_size
            how = (
                f"{dp} data-parallel ranks keep it with grad_accum {packs // per}, not {r.grad_accum}: pass "
                f"--cfg-options grad_accum={packs // per}"
                if packs % per == 0
                else f"{dp} data-parallel ranks cannot keep it (grad_accum would be {packs}/{per}): use a world size "
                f"dividing {packs}"
            )
            raise ValueError(
                f"the checkpoint's global batch is {packs} packs per step ({state['dp_size']} "
                f"data-parallel ranks x grad_accum {state['grad_accum']} x micro batch "
                f"{state['micro_batch_size']}); {how}, or pass --allow-batch-change to train on with "
                f"{dp * r.grad_accum * r.micro_batch_size} packs per step"
            )
        log(
            f"global batch {packs} -> {dp * r.grad_accum * r.micro_batch_size} packs per step from step {step + 1} "
            "(--allow-batch-change)"
        )
    now = recipe_record(r)
    for key in TUNABLE:
        if saved[key] != now[key]:
            log(f"{key} {_show(saved[key])} -> {_show(now[key])} from step {step + 1}")
    layout = [f"{key} {_show(saved.get(key))} -> {_show(now[key])}" for key in LAYOUT if saved.get(key) != now[key]]
    if state["world_size"] != world:
        layout.insert(0, f"world size {state['world_size']} -> {world}")
    if layout:
        log(
            f"re-partitioned from step {step}: "
            + ", ".join(layout)
            + f"; global batch {dp * r.grad_accum * r.micro_batch_size} packs"
        )
    return r


def _show(v: Any) -> str:
    return str(tuple(v)) if isinstance(v, list) else str(v)


def check_model_and_data(ckpt: TrainingCheckpoint, cfg: Any, fingerprint: dict[str, Any]) -> None:
    """Refuse (one line naming the field) a model or data that is not the checkpoint's."""
    saved, now = ckpt.state["config"], cfg.to_hf_dict()
    for key in sorted((set(saved) | set(now)) - {"torch_dtype"}):
        if saved.get(key) != now.get(key):
            raise ValueError(
                f"model config field {key} was {saved.get(key)!r} in the checkpoint and is "
                f"{now.get(key)!r} now; resume with the checkpoint's model (--model / recipe)"
            )
    before = ckpt.state["data"]
    if before["sha256"] != fingerprint["sha256"] or before["packs"] != fingerprint["packs"]:
        changed = [f"{a[0]} {a[1]} -> {b[1]} bytes" for a, b in zip(before["files"], fingerprint["files"]) if a != b]
        if len(before["files"]) != len(fingerprint["files"]):
            changed.append(f"{len(before['files'])} -> {len(fingerprint['files'])} files")
        raise ValueError(
            f"data differs from the checkpoint's ({before['packs']} -> {fingerprint['packs']} packs"
            + (f"; {changed[0]}" if changed else "; same files, other content")
            + "); resume with the "
            "same --data, tokenizer and max_length, or start a new --work-dir"
        )


def lora_record(lora: Any, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """What state.json says of a LoRA run: the adapters' shape and scale, and the base they belong to."""
    if lora is None:
        return None
    # expert_keys: a routed expert's adapters are kept per expert (``models/common/lora.py`` adapter_keys)
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "targets": list(lora.targets),
        "expert_keys": "per_expert",
        "base": base,
    }


def check_lora(ckpt: TrainingCheckpoint, lora: Any, base: dict[str, Any] | None) -> None:
    """Refuse (one line) a resume that changes full fine-tuning to LoRA or back, the adapters' rank, alpha or
    targets, or the frozen base (its fingerprint: file sizes and headers)."""
    saved, now = ckpt.state.get("lora"), lora_record(lora, base)
    if (saved is None) != (now is None):
        was, is_ = ("LoRA" if saved else "full fine-tuning"), ("LoRA" if now else "full fine-tuning")
        raise ValueError(f"{ckpt.where} is a {was} checkpoint, this run is {is_}; resume with the same --lora-rank")
    if saved is None or now is None:
        return
    for key in ("rank", "alpha", "targets"):
        if saved.get(key) != now[key]:
            raise ValueError(
                f"lora {key} was {saved.get(key)!r} in {ckpt.where} and is {now[key]!r} now; resume with the "
                f"checkpoint's --lora-{key}"
            )
    if "experts" in now["targets"] and saved.get("expert_keys") != now["expert_keys"]:
        raise ValueError(
            f"{ckpt.where} keeps the routed experts' adapters per shard (written before they were kept per "
            "expert); resume it with the moe-train version that wrote it, or start a new --work-dir"
        )
    check_base(saved.get("base"), now["base"], ckpt.where)


def checkpoint_state(job: Any, step: int) -> dict[str, Any]:
    """What rank 0 writes to ``state.json``: everything but the tensors and the RNG."""
    from moe_train.checkpoint.training_state import FORMAT

    r, sched = job.recipe, job.scheduler
    return {
        "format": FORMAT,
        "step": step,
        "optimizer_step": zero3.optimizer_step_count(job.engine),
        "world_size": job.world,
        "dp_size": job.dims.dp,
        "sp": job.dims.sp,
        "grad_accum": r.grad_accum,
        "micro_batch_size": r.micro_batch_size,
        "loader": job.data.loader.state_dict(),
        "scheduler": {
            "last_epoch": sched.last_epoch,
            "step_count": sched._step_count,
            "base_lrs": list(sched.base_lrs),
            "last_lr": list(sched.get_last_lr()),
        },
        "recipe": recipe_record(r),
        "config": job.cfg.to_hf_dict(
            torch_dtype=str(next(job.engine.module.parameters()).dtype).removeprefix("torch.")
        ),
        "data": job.fingerprint,
        "lora": lora_record(job.lora, job.base),
        # Persistent buffers (DeepSeek V3's correction bias): small, whole on every rank, fp32 exact in JSON.
        "buffers": {canonical_name(name): buf.float().tolist() for name, buf in persistent_buffers(job.engine.module)},
    }


@torch.no_grad()
def load(ckpt: TrainingCheckpoint, job: Any, shapes: dict[str, tuple[int, ...]], log: Callable[[str], None]) -> Any:
    """Every rank fills the partitions it now owns from the checkpoint; returns the checkpoint loaded.

    Each rank checks the digests of what it reads.  When any rank finds damage, every rank learns it;
    with ``--resume auto`` the checkpoint is moved aside and the newest intact one is loaded instead,
    provided it resumes the same run layout the engine was built for (else one line: run again)."""
    engine, rank = job.engine, job.rank
    zero3.begin_load(engine)
    while True:
        error, rng = None, None
        try:
            ckpt.load(zero3.optimizer_ranges(engine, create_state=True), job.cfg, job.layout, shapes)
            # RNG: a rank's own stream when the world is the same; else the stream of the rank with its index modulo.
            rng = ckpt.rng(rank % ckpt.world)
        except ValueError as e:
            error = str(e)
        finally:
            ckpt.close()
        reason = first_error(error)
        if reason is None:
            break
        failed = ckpt
        ckpt = job.ckpt.fall_back(failed, reason, auto=job.tc.resume == "auto", log=log)
        again = plan(ckpt, job.recipe, job.dims, job.tc.allow_batch_change, log)
        if again != job.recipe:
            raise ValueError(
                f"{failed.where} is damaged and was moved aside; the newest intact checkpoint, "
                f"{ckpt.where}, resumes with another layout than this start planned: run again with "
                "--resume auto"
            )
        check_model_and_data(ckpt, job.cfg, job.fingerprint)
    state = ckpt.state
    zero3.set_optimizer_step_count(engine, state["optimizer_step"])
    zero3.finish_load(engine)
    for name, buf in persistent_buffers(engine.module):
        saved = state.get("buffers", {}).get(canonical_name(name))
        if saved is None or len(saved) != buf.numel():
            raise ValueError(
                f"{ckpt.where} has no value of {buf.numel()} numbers for the buffer {canonical_name(name)}; "
                "resume from a checkpoint of this model family"
            )
        buf.copy_(torch.tensor(saved, dtype=torch.float32).view_as(buf))

    # The LR schedule continues at its step; a new peak lr scales it from here on.
    s = state["scheduler"]
    scheduler, loader, r = job.scheduler, job.data.loader, job.recipe
    scheduler.last_epoch, scheduler._step_count = s["last_epoch"], s["step_count"]
    scheduler.base_lrs = [r.lr] * len(scheduler.base_lrs)
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    zero3.set_engine_step(engine, ckpt.step, r.grad_accum)

    # The data position is in packs: the same pack comes next whatever the data-parallel size.
    saved = state["loader"]
    packs = saved["step"] * saved["dp_size"] * saved["micro_batch_size"]
    per_step = loader.dp_size * loader.micro_batch_size
    if packs % per_step:
        raise ValueError(
            f"the checkpoint stopped {packs} packs into epoch {saved['epoch']}, inside a micro-batch of "
            f"{per_step} packs of this layout; resume on {saved['dp_size']} data-parallel ranks"
        )
    loader.load_state_dict(
        {
            **saved,
            "step": packs // per_step,
            "dp_size": loader.dp_size,
            "micro_batch_size": loader.micro_batch_size,
            "grad_accum": loader.grad_accum,
        }
    )
    set_rng_state(rng)
    return ckpt
