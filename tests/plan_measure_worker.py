"""Measure the peak host memory of real ZeRO-3 CPU training steps, for ``moe_train.plan.memory``.

Run under torchrun (one process per rank)::

    python -m torch.distributed.run --nproc_per_node=2 tests/plan_measure_worker.py OUT_DIR SPEC_JSON

SPEC_JSON: {"model": {overrides of the tiny config}, "max_length": S, "steps": n,
"activation_checkpointing": bool, "lora": {"rank": R, "alpha": a} (optional: LoRA on a frozen base)}.
The model, engine and optimizer are built exactly as ``moe_train.engine.setup`` builds them
(``build_model`` under ``deepspeed.zero.Init``, ``torch.optim.AdamW``, the shipped
``deepspeed_zero3`` config filled by ``fill_auto``, fp32 on CPU), and each step computes the loss
as ``train`` does, on a packed row of S tokens.  Each rank writes ``OUT_DIR/rank{r}.json``: for
every phase, the highest resident memory above the baseline taken just before the model is built,
both in total (``/proc`` resident) and anonymous (resident minus file-backed pages: code pages of
torch's libraries first touched mid-run are not training memory).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import warnings

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _statm() -> tuple[int, int]:
    """(resident, anonymous resident) bytes of this process."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    return resident, resident - shared


class PhaseSampler:
    """Samples /proc every ``interval`` seconds and keeps the peak of each named phase."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.phase: str | None = None
        self.peaks: dict[str, list[int]] = {}  # phase -> [peak resident, peak anon, end resident, end anon]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _record(self) -> tuple[int, int]:
        total, anon = _statm()
        if self.phase is not None:
            p = self.peaks.setdefault(self.phase, [0, 0, 0, 0])
            p[0], p[1] = max(p[0], total), max(p[1], anon)
        return total, anon

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def mark(self, phase: str | None) -> None:
        """End the current phase (recording where it ended) and start ``phase``."""
        total, anon = self._record()
        if self.phase is not None:
            self.peaks[self.phase][2:] = [total, anon]
        self.phase = phase
        self._record()

    def stop(self) -> None:
        self.mark(None)
        self._stop.set()
        self._thread.join()


def packed_batch(vocab_size: int, max_length: int, seed: int) -> dict:
    """One packed row of ``max_length`` tokens: six samples of unequal lengths, as the loader packs
    them (attention runs per sample and keeps no length-squared tensor, so the split does not
    change the memory)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bounds = [0, *sorted((torch.randperm(max_length - 1, generator=g)[:5] + 1).tolist()), max_length]
    input_ids = torch.randint(2, vocab_size, (1, max_length), generator=g)
    position_ids = torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:])])[None]
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
    }


def warm_imports() -> None:
    """Import now what the first optimizer and ``deepspeed.initialize`` import lazily.

    torch.optim imports torch._dynamo on first use, and DeepSpeed's engine imports its expert-
    parallel and Muon modules, which pull in torch._inductor, sympy, networkx and jinja2: about
    160 MiB of Python heap per process whatever the model.  That is code, not training memory, so
    it is loaded before the baseline is taken.
    """
    import importlib

    import torch

    w = torch.zeros(1, requires_grad=True)
    w.grad = torch.zeros(1)
    torch.optim.AdamW([w]).step()
    for name in ("deepspeed.module_inject.auto_ep_layer", "deepspeed.runtime.zero.muon.muon_optimizer"):
        try:
            importlib.import_module(name)
        except ImportError:  # another DeepSpeed version: then the baseline includes what it imports
            pass


def measured_memory(record: dict) -> dict[str, int]:
    """What a rank's record measured, in the planner's terms (bytes): the tests compare these with it."""
    ph = record["phases"]
    states = ph["after1"]["end"]  # Adam's m and v exist from the first step on
    gathered = record["gathered_numel_at_loss"][-1] * 4
    return {
        "model states": states,
        "step transients": ph["step2"]["peak"] - states,
        "gathered at loss": gathered,
        "activations at loss": ph["forward2"]["end"] - states - gathered,
        "peak": max(p["peak"] for p in ph.values()),
    }


def memory_table(rank: int, predicted: dict, measured: dict) -> str:
    return "\n".join(
        f"rank {rank} {k:20s} predicted {predicted[k] / 2**20:7.1f} MiB, measured {measured[k] / 2**20:7.1f} MiB"
        for k in predicted
    )


def main(out_dir: str, spec: dict) -> None:
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    import torch

    warm_imports()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config
    from moe_train.engine.distributed import destroy_distributed, hard_exit, init_distributed
    from moe_train.engine.model import build_model
    from moe_train.models.common.experts import ExpertLayout
    from moe_train.models.common.lora import LoraConfig
    from moe_train.models.common.loss import shift_labels
    from moe_train.models.deepseek_v2 import DeepseekV2Config
    from moe_train.parallel.dims import ParallelDims

    info = init_distributed("pytorch")
    rank, world = info.rank, info.world_size
    cfg = DeepseekV2Config.from_name("tiny", **spec["model"])
    layout = ExpertLayout(**spec["layout"])
    ds_config = fill_auto(
        load_deepspeed_config(spec.get("deepspeed", "deepspeed_zero3")),
        micro_batch_size=1,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        bf16=False,
        hidden_size=cfg.hidden_size,
    )
    batches = [packed_batch(cfg.vocab_size, spec["max_length"], seed=rank * 1000 + s) for s in range(spec["steps"])]

    sampler = PhaseSampler()
    gc.collect()
    torch.distributed.barrier()
    baseline_total, baseline_anon = _statm()
    modules = len(sys.modules)
    sampler.start()
    t0 = time.perf_counter()

    sampler.mark("build")
    model = build_model(
        cfg,
        layout,
        ParallelDims(world, rank=rank),
        ds_config,
        torch.float32,
        torch.device("cpu"),
        None,
        seed=0,
        activation_checkpointing=spec.get("activation_checkpointing", False),
        lora=LoraConfig(**spec["lora"]) if spec.get("lora") else None,
    )
    sampler.mark("optimizer")
    trained = [p for p in model.parameters() if p.requires_grad]  # as build_engine: LoRA's adapters only
    optimizer = torch.optim.AdamW(trained, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sampler.mark("init")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    engine.train()
    gathered_at_loss = []
    for step, b in enumerate(batches, start=1):
        counts = torch.tensor([float(b["input_ids"].numel())])
        torch.distributed.all_reduce(counts)
        sampler.mark(f"forward{step}")
        out = engine(
            b["input_ids"],
            position_ids=b["position_ids"],
            cu_seqlens=b["cu_seqlens"],
            targets=shift_labels(b["labels"]),
        )  # the trainer's chunked head
        ce_sum = out.loss
        loss = ce_sum * (world / counts[0].item()) + out.aux_loss
        gathered_at_loss.append(
            sum(
                p.numel()
                for p in engine.module.parameters()
                if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist
            )
        )
        sampler.mark(f"backward{step}")
        engine.backward(loss)
        sampler.mark(f"step{step}")
        engine.step()
        sampler.mark(f"after{step}")
        del out, ce_sum, loss
    sampler.stop()

    record = {
        "rank": rank,
        "world_size": world,
        "seconds": time.perf_counter() - t0,
        "phases": {
            name: {
                "peak": v[0] - baseline_total,
                "peak_anon": v[1] - baseline_anon,
                "end": v[2] - baseline_total,
                "end_anon": v[3] - baseline_anon,
            }
            for name, v in sampler.peaks.items()
        },
        "gathered_numel_at_loss": gathered_at_loss,
        "partition_numel": sum(p.ds_tensor.ds_numel for p in engine.module.parameters()),
        "modules_imported_after_baseline": len(sys.modules) - modules,
        "persistent_numel": sum(p.numel() for p in engine.module.parameters() if p.ds_persist),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f, indent=1)
    destroy_distributed()
    hard_exit(0)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
