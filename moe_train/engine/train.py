"""The training loop: steps, validation and checkpoints at their cadence, a clean stop on a signal, the
HF export and the run's summary at the end.  Start-up is `setup` (moe_train/engine/setup.py); the step
and its exact token-weighted loss are in moe_train/engine/step.py."""

from __future__ import annotations

import math
import posixpath
import signal
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from moe_train.engine.divergence import Diverged, DivergenceGuard, finite_or_none
from moe_train.engine.log import log
from moe_train.engine.metrics import MetricsWriter, peak_tflops, read_metrics, summarize
from moe_train.engine.model import quiet_deepspeed
from moe_train.engine.preemption import StopFlag, StopRequested, catch_early_warning
from moe_train.engine.setup import Job, TrainConfig, setup
from moe_train.engine.step import evaluate, run_step, step_record
from moe_train.engine.tracking import TRACKERS, Trackers
from moe_train.models import spec_of
from moe_train.parallel import zero3
from moe_train.parallel.distribute import all_experts, gathered_parameters
from moe_train.recipes import recipe_record
from moe_train.storage import redact, redact_all, stall_notice


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


def _metrics_writer(job: Job) -> MetricsWriter | None:
    """Rank 0's metrics segment, after the run's recipe and DeepSpeed config are written (each segment)."""
    if job.rank != 0:
        return None
    import deepspeed

    hardware = {
        "world_size": job.world,
        "sp": job.recipe.sp,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "device": torch.cuda.get_device_name() if job.device.type == "cuda" else job.device.type,
        # where this segment stops (max_steps) and where the run's schedule ends (its epochs): the report's
        # finished / stopped at N of M
        "total_steps": job.total_steps,
        "planned_steps": job.data.steps_per_epoch * job.recipe.epochs,
    }
    report_to = job.recipe.report_to
    metrics = MetricsWriter(
        job.run,
        resumed_from=job.step,
        tensorboard="tensorboard" in report_to,
        log=lambda m: log(0, m),
        header=hardware,
    )
    record = recipe_record(job.recipe)
    job.run.write_run_config(record, getattr(job.engine, "config", None) or {})
    if set(report_to) & set(TRACKERS):
        run = job.run
        metrics.trackers = Trackers(
            report_to,
            params=record,
            segment={
                "segment": metrics.segment,
                "resumed_from": job.step,
                "world_size": job.world,
                "run_name": f"{job.recipe.name} {posixpath.basename(run.root.rstrip('/'))}",
            },
            ids=run.read_json(run.tracking) if run.fs.exists(run.tracking) else {},
            save_ids=lambda ids: run.put_json(run.tracking, ids, indent=2),
            wandb_dir=run.wandb_dir(),
            log=lambda m: log(0, m),
        )
    return metrics


def _save(job: Job, step: int) -> None:
    """A training checkpoint of ``step`` (a collective)."""
    from moe_train.engine.resume import checkpoint_state

    with stall_notice(f"checkpoint of step {step} to {job.run.where}", lambda m: log(job.rank, m)):
        path = job.ckpt.save(
            step,
            zero3.optimizer_ranges(job.engine, create_state=True),
            job.cfg,
            job.layout,
            checkpoint_state(job, step),
            job.data.tokenizer_dir,
            job.world,
        )
    log(job.rank, f"saved checkpoint {job.run.display(path)}")


def _train(job: Job) -> dict[str, Any]:
    metrics = _metrics_writer(job)
    try:
        return _run(job, metrics)
    except BaseException as e:  # the segment's end, as the trackers should show it
        if metrics is not None:
            metrics.close("KILLED" if isinstance(e, StopRequested) else "FAILED")
        raise


def _run(job: Job, metrics: MetricsWriter | None) -> dict[str, Any]:
    tc, r, rank = job.tc, job.recipe, job.rank
    peak = peak_tflops(tc.peak_tflops)

    def run_eval(at: int) -> None:
        result = evaluate(job)
        log(rank, f"step {at}: val_loss {result['val_loss']:.4f} over {result['val_tokens']} tokens")
        if metrics is not None:
            metrics.write({"step": at, **result})

    def micro_batches():
        while True:
            yield from job.data.loader

    batches = micro_batches()
    step, losses, tgs = job.step, [], []
    bar = None
    if rank == 0 and tc.progress:
        from tqdm import tqdm

        # In a log file (Slurm, a pod) the bar's Unicode blocks can be cut mid-character where srun
        # interleaves stdout and stderr; ASCII there keeps the log valid UTF-8.
        bar = tqdm(total=job.total_steps, initial=step, desc="train", dynamic_ncols=True, ascii=not sys.stderr.isatty())
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
                        metrics.close("FAILED")
                    raise
                if note:
                    log(rank, note)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result['loss']:.4f}", tgs=f"{tgs[-1]:.0f}")
                if job.data.eval_loader is not None and r.eval_steps and step % r.eval_steps == 0:
                    run_eval(step)
                stop_now = stop.agreed()
                # The run's last step is saved too (max_steps, end of data): no run ends without its state.
                due = step % r.save_steps == 0 or step == job.total_steps if r.save_steps else False
                if (due and guard.healthy) or stop_now:
                    _save(job, step)
                if stop_now:
                    if metrics is not None:  # why the run stopped, for the report
                        why = signal.Signals(stop.signum).name if stop.signum else "a signal to another rank"
                        metrics.write({"step": step, "event": "stopped", "signal": why})
                    raise stop.requested(step)
    finally:
        if bar is not None:
            bar.close()

    if job.data.eval_loader is not None and not (r.eval_steps and step % r.eval_steps == 0):
        run_eval(step)  # the final model's validation loss
    summary: dict[str, Any] = {"steps": step, "losses": losses, "tgs": tgs, "work_dir": redact(job.run.url)}
    if tc.export:
        if not r.save_steps:
            log(rank, "no training checkpoint (--save-steps 0): the export below is this run's only state")
        with stall_notice(f"export to {job.run.display(job.run.hf_model)}", lambda m: log(rank, m)):
            summary.update(redact_all(export(job, step)))
        if metrics is not None:
            exported = {k: summary[k] for k in ("hf_adapter", "hf_model") if k in summary}
            if "hf_model" in summary:
                exported["export_peak_rss_delta_mb"] = round(summary["export_peak_rss_delta_mb"], 2)
                exported["model_mb"] = round(summary["model_mb"], 2)
            metrics.write({"step": step, "event": "export", **exported})
    if metrics is not None:
        metrics.close()
        # The whole run, all segments; `summary["segment_losses"]`: this segment's alone.
        run = {**summary, **summarize(read_metrics(job.run, segments=True)), "segment_losses": losses}
        run["generation"] = job.run.generation  # report ignores a summary a stale holder wrote late
        job.run.put_json(job.run.summary, run, indent=2)
    job.ckpt.close()
    return summary


def export_adapter(job: Job, step: int) -> dict[str, Any]:
    """A LoRA run's PEFT adapter directory (run's hf_adapter/), streamed one adapted module (or one layer's
    routed experts, from every EP rank) at a time."""
    from moe_train.checkpoint.adapters import save_adapter

    url = job.run.hf_adapter_url
    source = job.recipe.model
    extra = {"step": step, "recipe": job.recipe.name, **({"source": redact(source)} if source else {})}
    extra["generation"] = job.run.generation  # as the HF export's: the lease it was written under
    job.run.check_owner()
    t0 = time.perf_counter()
    save_adapter(
        job.engine.module,
        url,
        job.lora,
        zero3.gathered_together,
        all_experts=all_experts(job.dims),
        is_writer=job.rank == 0,
        base_url=source,
        extra=extra,
    )
    dist.barrier()  # the adapter is complete (COMPLETE written) before any rank moves on
    log(job.rank, f"exported the PEFT adapter to {redact(url)} in {time.perf_counter() - t0:.1f}s")
    return {"hf_adapter": redact(url)}


def export(job: Job, step: int) -> dict[str, Any]:
    """Stream the trained model into the run's hf_model/ (a LoRA run: the PEFT adapter into hf_adapter/, and the
    merged model into hf_model/ with --merge); reports the writer's peak memory."""
    from moe_train.checkpoint.adapters import merged_parameters
    from moe_train.checkpoint.hf_layout import HFCheckpoint, save_pretrained
    from moe_train.engine.memory import PeakRSS

    adapter = {} if job.lora is None else export_adapter(job, step)
    if adapter and not job.tc.merge:
        return adapter
    url = job.run.hf_model_url
    module = job.engine.module
    source = job.recipe.model
    # Keys the family carries untrained (DeepSeek V3's MTP layers) are copied from the source checkpoint.
    carry_from = HFCheckpoint(source) if source and spec_of(job.cfg).carried_key is not None else None
    extra = {"step": step, "recipe": job.recipe.name, **({"source": redact(source)} if source else {})}
    extra["generation"] = job.run.generation  # rank 0's, the writer's: the lease it exports under
    job.run.check_owner()
    t0 = time.perf_counter()
    if job.lora is None:
        tensors = gathered_parameters(module, job.dims)
    else:  # the base with the adapters merged in, one module gathered at a time
        tensors = merged_parameters(module, zero3.gathered_together)
        extra["lora_merged"] = True
    # Under EP one dtype for the experts this rank does not hold.
    dtype = None if job.dims.experts is None else next(module.parameters()).dtype
    with PeakRSS() as rss:
        carried = save_pretrained(
            module,
            url,
            tensors=tensors,
            is_writer=job.rank == 0,
            dtype=dtype,
            tokenizer_dir=job.data.tokenizer_dir,
            extra=extra,
            carry_from=carry_from,
            before_complete=job.run.check_owner,
        )
    if carried:
        log(
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
        **adapter,
        "hf_model": redact(url),
        "export_seconds": time.perf_counter() - t0,
        "export_peak_rss_delta_mb": rss.peak_delta / 2**20,
        "model_mb": model_bytes / 2**20,
    }
    log(
        job.rank,
        f"exported HF checkpoint to {redact(url)} in {out['export_seconds']:.1f}s; writer peak RSS "
        f"+{out['export_peak_rss_delta_mb']:.1f} MiB for a {out['model_mb']:.1f} MiB model",
    )
    return out
