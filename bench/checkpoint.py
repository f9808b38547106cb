"""P5: training-checkpoint save and load, ours (topology-free) against DeepSpeed's native, at the P2 size.

Both run in the same 2 ZeRO-3 ranks (gloo, CPU) on the P2 model (``bench/zero3.py``: DeepSeek-V2-Lite's
structure at the tiny widths, shard-8), after one training step so the Adam moments exist, to a
local directory, round-robin (native, ours, ours, native, ...), medians per rank:

- native: ``engine.save_checkpoint`` / ``engine.load_checkpoint`` (pickled ``torch.save`` files,
  bound to the world size);
- ours: ``CheckpointManager.save`` (each rank streams its fp32 master and Adam ranges, keyed by HF
  name, as safetensors, digesting each range as it writes it; JSON state; COMPLETE with sizes and
  digests) and ``TrainingCheckpoint.load`` into a live engine (verification of every file, header
  and range digest included).

The cost of verification is ours_load against the same load with the digests not checked (every
file treated as vouched for by a store, ``TrainingCheckpoint.vouched``), round-robin, with the page
cache warm and cold (each rank drops the checkpoint's pages with ``posix_fadvise(DONTNEED)`` first,
so the load reads the disk): the main thread's CPU time of the two, fastest repeat (``verify_share``),
against the load's CPU time (warm) or wall time (cold).

Peak extra RSS is the highest resident memory above the start of each call (sampled every 2 ms),
against the largest single parameter partition (fp32 bytes of the biggest ``ds_tensor``).  Both
write through the page cache; the figures are the CPU work of each format, not disk bandwidth.

Run by ``python -m bench --only p5``; the worker side is ``python -m bench.checkpoint --worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import Result, cpu_ranks_env, table, torchrun_module
from bench.zero3 import MODES, REFERENCE_SHARD, batch, model_config

REPEATS = {"test": 1, "quick": 3, "full": 5}


def worker(mode: str, out_dir: str, work: str) -> None:
    from moe_train.engine.distributed import destroy_distributed, hard_exit, init_distributed

    code = 0
    try:
        info = init_distributed("pytorch")
        torch.set_num_threads(1)
        rank, world = info.rank, info.world_size
        records = [measure(mode, label, cfg, rank, world, os.path.join(work, label)) for label, cfg in models(mode)]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))
        destroy_distributed()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    hard_exit(code)


def models(mode: str) -> list[tuple[str, object]]:
    """The P2 model, and the same structure at widths where partitions are MiBs, not KiBs."""
    from moe_train.models.common.experts import ExpertLayout

    p2 = model_config(mode, "shard", REFERENCE_SHARD[mode])
    wide = p2[0].replace(
        hidden_size=512,
        moe_intermediate_size=352,
        intermediate_size=1024,
        num_hidden_layers=2 if mode == "test" else 4,
        n_routed_experts=16,
    )
    return [("P2", p2), ("wide", (wide, ExpertLayout("shard", 8)))]


def measure(mode: str, label: str, model_and_layout, rank: int, world: int, work: str) -> dict:
    import deepspeed

    from moe_train.checkpoint.hf_layout import expected_hf_keys
    from moe_train.checkpoint.training_state import CheckpointManager, TrainingCheckpoint
    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config
    from moe_train.engine.memory import PeakRSS
    from moe_train.engine.model import build_model
    from moe_train.models.common.loss import causal_lm_loss
    from moe_train.parallel import ParallelDims, zero3
    from moe_train.run_dir import RunDir

    cfg, layout = model_and_layout
    ds_config = fill_auto(
        load_deepspeed_config("deepspeed_zero3"),
        micro_batch_size=1,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        bf16=False,
        hidden_size=cfg.hidden_size,
    )
    model = build_model(
        cfg,
        layout,
        ParallelDims(world, rank=rank),
        ds_config,
        torch.float32,
        torch.device("cpu"),
        None,
        seed=0,
        activation_checkpointing=False,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    b = batch(mode, rank, cfg.vocab_size)
    out = engine(b["input_ids"], cu_seqlens=b["cu_seqlens"])
    engine.backward(causal_lm_loss(out.logits, b["labels"]) + out.aux_loss)
    engine.step()

    shapes = {k: s for k, (_, s) in expected_hf_keys(engine.module).items()}
    manager = CheckpointManager(RunDir(work), rank, keep=0)
    native_dir = os.path.join(work, "native")
    largest = max(p.ds_tensor.numel() * 4 for p in engine.module.parameters())

    def native_save():
        engine.save_checkpoint(native_dir, tag="bench", save_latest=False)

    def native_load():
        engine.load_checkpoint(native_dir, tag="bench", load_module_strict=True)

    state = bench_state(cfg, layout, world)
    step_dir = os.path.join(work, "checkpoints", "step-00000001")

    def ours_save():
        manager.save(1, zero3.optimizer_ranges(engine), cfg, layout, state, None, world)

    def ours_load(verify: bool = True):
        ckpt = TrainingCheckpoint(manager.fs, step_dir)
        if not verify:
            ckpt.vouched = set(ckpt.files)  # as if a store vouched for every file: no digest is computed
        with torch.no_grad():
            zero3.begin_load(engine)
            ckpt.load(zero3.optimizer_ranges(engine), cfg, layout, shapes)
            zero3.finish_load(engine)

    cases = {
        "native_save": native_save,
        "ours_save": ours_save,
        "native_load": native_load,
        "ours_load": ours_load,
        "ours_load_unverified": lambda: ours_load(verify=False),
        "ours_load_cold": ours_load,
        "ours_load_cold_unverified": lambda: ours_load(verify=False),
    }
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    cpu_seconds: dict[str, list[float]] = {k: [] for k in cases}
    rss: dict[str, list[int]] = {k: [] for k in cases}
    for round_ in range(REPEATS[mode] + 1):  # the first round warms up
        order = list(cases) if round_ % 2 == 0 else [*list(cases)[1::-1], *list(cases)[:1:-1]]
        for name in order:
            if "cold" in name:
                drop_page_cache(step_dir)
            dist.barrier()
            t0 = time.perf_counter()
            with PeakRSS() as m:
                c0 = time.thread_time()
                cases[name]()
                cpu = time.thread_time() - c0
            dist.barrier()
            if round_:
                seconds[name].append(time.perf_counter() - t0)
                cpu_seconds[name].append(cpu)
                rss[name].append(m.peak_delta)
    sizes = {
        "native": sum(f.stat().st_size for f in Path(native_dir, "bench").rglob("*") if f.is_file()),
        "ours": sum(f.stat().st_size for f in Path(work, "checkpoints", "step-00000001").rglob("*") if f.is_file()),
    }
    record = {
        "model": label,
        "rank": rank,
        "largest_partition_bytes": largest,
        "files_bytes": sizes,
        "params": sum(p.ds_numel for p in engine.module.parameters()),
        "seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "cpu_seconds": {k: min(v) for k, v in cpu_seconds.items()},  # CPU time's noise only ever adds
        "peak_rss_delta": {k: max(v) for k, v in rss.items()},
    }
    engine.destroy()
    return record


def bench_state(cfg, layout, world: int) -> dict:
    """A state.json of the shape the trainer writes (``resume.checkpoint_state``), for a run that took one step."""
    from moe_train.checkpoint.training_state import FORMAT
    from moe_train.engine.resume import recipe_record
    from moe_train.recipes import get_recipe

    recipe = get_recipe("tiny").replace(
        moe_implementation=layout.moe_implementation, expert_in_one_shard=layout.expert_in_one_shard
    )
    one = {"epoch": 0, "step": 1, "num_packs": 1, "dp_size": world, "micro_batch_size": 1, "seed": 0, "shuffle": 1}
    return {
        "format": FORMAT,
        "step": 1,
        "optimizer_step": 1,
        "world_size": world,
        "dp_size": world,
        "sp": 1,
        "grad_accum": 1,
        "micro_batch_size": 1,
        "loader": {**one, "grad_accum": 1},
        "scheduler": {"last_epoch": 1, "step_count": 2, "base_lrs": [1e-4], "last_lr": [1e-4]},
        "recipe": {**recipe_record(recipe), "deepspeed": "deepspeed_zero3"},
        "config": cfg.to_hf_dict(torch_dtype="float32"),
        "data": {"files": [], "packs": 1, "sha256": ""},
        "buffers": {},
    }


def drop_page_cache(directory: str) -> None:
    """The files' pages out of the page cache (written back first), so the next read comes from the disk."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def launch(mode: str, nproc: int = 2, timeout: int = 1200) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        work = os.path.join(tmp, "work")
        env = cpu_ranks_env(tmp)
        cmd = [
            *torchrun_module("bench.checkpoint", nproc),
            "--worker",
            "--mode",
            mode,
            "--out",
            tmp,
            "--work",
            work,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        records = [Path(tmp, f"rank{r}.json") for r in range(nproc)]
        if proc.returncode != 0 or not all(r.exists() for r in records):
            raise RuntimeError(f"checkpoint benchmark workers failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        shutil.rmtree(work, ignore_errors=True)
        return [rec for r in records for rec in json.loads(r.read_text())]


def verify_share(r: dict, cache: str) -> float:
    """The CPU time verification adds to a load (checked minus unchecked, fastest repeats: hashing is CPU
    work, and CPU time is robust to the other jobs on a shared machine), over the load's own time: its
    CPU time with a warm page cache (a CPU-bound copy), its wall time with a cold one (the disk's time
    counts)."""
    c = r["cpu_seconds"]
    extra = c[f"ours_load{cache}"] - c[f"ours_load{cache}_unverified"]
    return extra / (c["ours_load"] if not cache else r["seconds"][f"ours_load{cache}"])


def summarise(mode: str, records: list[dict]) -> Result:
    rows, figures = [], {}
    for r in records:
        s, m = r["seconds"], r["peak_rss_delta"]
        rows.append(
            [
                r["model"],
                r["rank"],
                r["params"] / 1e6,
                r["largest_partition_bytes"] / 2**20,
                s["native_save"] * 1e3,
                s["ours_save"] * 1e3,
                s["ours_save"] / s["native_save"],
                s["native_load"] * 1e3,
                s["ours_load"] * 1e3,
                m["native_save"] / 2**20,
                m["ours_save"] / 2**20,
                m["native_load"] / 2**20,
                m["ours_load"] / 2**20,
            ]
        )
    verify_rows = []
    for r in records:
        s, c = r["seconds"], r["cpu_seconds"]
        verify_rows.append(
            [
                r["model"],
                r["rank"],
                s["ours_load"] * 1e3,
                c["ours_load"] * 1e3,
                c["ours_load_unverified"] * 1e3,
                verify_share(r, ""),
                s["ours_load_cold"] * 1e3,
                c["ours_load_cold"] * 1e3,
                c["ours_load_cold_unverified"] * 1e3,
                verify_share(r, "_cold"),
            ]
        )
    for label, prefix in (("P2", "p5_"), ("wide", "p5_wide_")):
        of = [r for r in records if r["model"] == label]
        for cache in ("", "_cold"):
            figures[f"{prefix}verify_fraction{cache}"] = max(verify_share(r, cache) for r in of)
        figures[prefix + "save_time_ratio"] = max(r["seconds"]["ours_save"] / r["seconds"]["native_save"] for r in of)
        figures[prefix + "load_time_ratio"] = max(r["seconds"]["ours_load"] / r["seconds"]["native_load"] for r in of)
        for op in ("save", "load"):
            figures[f"{prefix}{op}_rss_per_partition"] = max(
                r["peak_rss_delta"][f"ours_{op}"] / r["largest_partition_bytes"] for r in of
            )
    p2 = next(r for r in records if r["model"] == "P2")
    m = MODES[mode]
    notes = (
        f"P2: the bench/zero3.py model ({m['layers']} layers, {m['experts']} experts, shard-{REFERENCE_SHARD[mode]}, "
        f"tiny widths); wide: its structure at hidden 512, 16 experts of 352, 4 layers, so that partitions are "
        "MiBs. 2 ranks on gloo, fp32, one step taken, local files; median of "
        f"{REPEATS[mode]} round-robin repeats per rank, +MiB = peak RSS above the start, worst repeat. Files (P2): "
        f"native {p2['files_bytes']['native'] / 2**20:.1f} MiB, ours {p2['files_bytes']['ours'] / 2**20:.1f} MiB."
    )
    headers = [
        "model",
        "rank",
        "M params",
        "largest partition MiB",
        "native save ms",
        "ours save ms",
        "save ratio",
        "native load ms",
        "ours load ms",
        "native save +MiB",
        "ours save +MiB",
        "native load +MiB",
        "ours load +MiB",
    ]
    targets = {
        "p5_save_time_ratio": ("<=", 1.5),
        "p5_save_rss_per_partition": ("<=", 2),
        "p5_load_rss_per_partition": ("<=", 2),
        "p5_wide_save_time_ratio": ("<=", 1.5),
        "p5_wide_save_rss_per_partition": ("<=", 2),
        "p5_wide_load_rss_per_partition": ("<=", 2),
        **{f"p5{w}_verify_fraction{c}": ("<=", 0.1) for w in ("", "_wide") for c in ("", "_cold")},
    }
    verify_headers = [
        "model",
        "rank",
        "warm: load ms",
        "load CPU ms (min)",
        "unverified CPU ms (min)",
        "verification share",
        "cold: load ms",
        "load CPU ms (min)",
        "unverified CPU ms (min)",
        "verification share",
    ]
    return Result(
        "P5 training checkpoint save/load, ours vs DeepSpeed native, 2 ranks",
        figures,
        table(headers, rows)
        + "\n\nVerification (digests of every header and range read) within ours load:\n\n"
        + table(verify_headers, verify_rows),
        notes,
        targets,
    )


def run(mode: str = "quick") -> Result:
    return summarise(mode, launch(mode))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank (internal)")
    parser.add_argument("--mode", choices=list(MODES), default="quick", help="problem size")
    parser.add_argument("--out", help="where each rank writes its record (worker only)")
    parser.add_argument("--work", help="checkpoint directory (worker only)")
    args = parser.parse_args()
    if args.worker:
        worker(args.mode, args.out, args.work)
    else:
        print(run(args.mode))
