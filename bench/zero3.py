"""P2: ZeRO-3 training steps on 2 ranks (gloo, CPU) for every expert layout of a tiny many-expert model.

Variants: ``origin`` (one module per expert, DeepSpeed fetches each expert's three weights);
``origin+leaf`` (the same, with ``deepspeed.utils.set_z3_leaf_modules`` on the MoE block so it is
fetched as one unit); ``shard-S`` (our layout with S experts per shard) and ``all-in-one`` (every
routed expert of a layer in one shard).

Collectives are counted for real: before DeepSpeed sets up its communication backend the worker
wraps torch.distributed's collectives, and each call adds to a per-step count and byte total
(bytes gathered: the output of all-gathers).  "Peak gathered" is the most parameter bytes held
gathered (not just the rank's partition) at once, sampled after every all-gather in one extra
instrumented step, so its cost does not show in the step times.  Parameters ZeRO keeps whole on
every rank (below the persistence threshold: norms) are never gathered and not counted.

ZeRO-3 runs the shipped config with ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance``
at 0: every parameter is released after use, as for a model far above the shipped 1e9 thresholds.
The model has DeepSeek-V2-Lite's structure (no q LoRA, 64 experts top-6, first layer dense) at the
tiny widths, and depth enough that per-layer costs dominate the fixed ones (embedding, LM head).

Run by ``python -m bench``; the worker side is ``python -m bench.zero3 --worker`` under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import Result, cpu_ranks_env, table, torchrun_module

WRAPPED = (
    "all_gather_single",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter",
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "all_to_all_single",
    "all_to_all",
)
GATHERS = ("all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather")

MODES = {
    # layers, experts, top-k, tokens per rank per step, variants, timed steps
    "test": dict(layers=2, experts=8, top_k=2, tokens=64, steps=1, shards=[4]),
    "quick": dict(layers=12, experts=64, top_k=6, tokens=256, steps=2, shards=[8]),
    "full": dict(layers=27, experts=64, top_k=6, tokens=256, steps=5, shards=[4, 8, 16]),
}
REFERENCE_SHARD = {"test": 4, "quick": 8, "full": 8}


class CollectiveCounter:
    """Counts calls and bytes of torch.distributed collectives; optionally samples gathered bytes."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.params: list[torch.nn.Parameter] = []  # set to sample gathered bytes after each gather
        self.peak_gathered = 0
        self.peak_gathered_experts = 0
        self._inside = threading.local()  # .active: a wrapped collective is running in this thread
        self._originals: dict = {}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.peak_gathered = self.peak_gathered_experts = 0

    def install(self) -> None:
        """Wrap the collectives in torch.distributed and its c10d module (DeepSpeed uses both)."""
        from torch.distributed import distributed_c10d

        self._originals = {}
        for name in WRAPPED:
            original = getattr(distributed_c10d, name, None)
            if original is None:
                continue
            self._originals[name] = original
            wrapped = self._wrap(name, original)
            setattr(distributed_c10d, name, wrapped)
            if getattr(dist, name, None) is original:
                setattr(dist, name, wrapped)

    def uninstall(self) -> None:
        from torch.distributed import distributed_c10d

        for name, original in self._originals.items():
            if getattr(dist, name, None) is getattr(distributed_c10d, name):
                setattr(dist, name, original)
            setattr(distributed_c10d, name, original)
        self._originals = {}

    def _wrap(self, name, original):
        def wrapper(*args, **kwargs):
            if getattr(self._inside, "active", False):
                return original(*args, **kwargs)  # torch runs some collectives through others: count the outer
            self.calls[name] += 1
            first = args[0] if args else next(iter(kwargs.values()), None)
            self.bytes[name] += _nbytes(first)
            self._inside.active = True
            try:
                out = original(*args, **kwargs)
            finally:
                self._inside.active = False
            if self.params and name in GATHERS:
                self._sample()
            return out

        wrapper.__wrapped__ = original
        return wrapper

    def _sample(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        total = experts = 0
        for p in self.params:
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                n = p.ds_numel * p.element_size()
                total += n
                experts += n if p.bench_is_expert else 0
        self.peak_gathered = max(self.peak_gathered, total)
        self.peak_gathered_experts = max(self.peak_gathered_experts, experts)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


def variants(mode: str) -> list[tuple[str, str, int | None, bool]]:
    """(name, moe_implementation, expert_in_one_shard, leaf) of every variant run in `mode`."""
    m = MODES[mode]
    out = [("origin", "origin", None, False), ("origin+leaf", "origin", None, True)]
    out += [(f"shard-{s}", "shard", s, False) for s in m["shards"]]
    return out + [("all-in-one", "shard", m["experts"], False)]


def model_config(mode: str, moe_implementation: str, expert_in_one_shard: int | None):
    """(config, expert layout) of a variant."""
    from moe_train.models.common.experts import ExpertLayout
    from moe_train.models.deepseek_v2.config import DeepseekV2Config

    m = MODES[mode]
    # DeepSeek-V2-Lite's structure (no q LoRA, greedy top-k over many experts) at the tiny widths.
    cfg = DeepseekV2Config.from_name(
        "tiny",
        num_hidden_layers=m["layers"],
        n_routed_experts=m["experts"],
        num_experts_per_tok=m["top_k"],
        q_lora_rank=None,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    )
    return cfg, ExpertLayout(moe_implementation, expert_in_one_shard)


def batch(mode: str, rank: int, vocab: int) -> dict[str, torch.Tensor]:
    """One packed row per rank: samples of mixed lengths, like the trainer's loader gives."""
    tokens = MODES[mode]["tokens"]
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    cuts = sorted(torch.randperm(tokens - 1, generator=g)[:3].add(1).tolist())
    return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": torch.tensor([0, *cuts, tokens], dtype=torch.int32)}


def run_variant(
    mode: str, counter: CollectiveCounter, name: str, impl: str, shard: int | None, leaf: bool, world: int
) -> dict:
    import deepspeed

    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config
    from moe_train.engine.model import build_model
    from moe_train.models.common.loss import causal_lm_loss
    from moe_train.models.common.moe import MoE
    from moe_train.parallel import ParallelDims

    cfg, layout = model_config(mode, impl, shard)
    ds_config = fill_auto(
        load_deepspeed_config("deepspeed_zero3"),
        micro_batch_size=1,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        bf16=False,
        hidden_size=cfg.hidden_size,
    )
    # Release every parameter right after its module ran: the shipped 1e9 would keep this tiny
    # model gathered from forward to backward, and peak gathered bytes would be the whole model.
    ds_config["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
    dims = ParallelDims(world, rank=dist.get_rank())
    model = build_model(
        cfg, layout, dims, ds_config, torch.float32, torch.device("cpu"), None, seed=0, activation_checkpointing=False
    )
    if leaf:
        deepspeed.utils.set_z3_leaf_modules(model, [MoE])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    b = batch(mode, dist.get_rank(), cfg.vocab_size)

    def step() -> float:
        out = engine(b["input_ids"], cu_seqlens=b["cu_seqlens"])
        loss = causal_lm_loss(out.logits, b["labels"])
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    step()  # warm-up: DeepSpeed traces the module order on the first step
    times, calls, gathered, losses = [], [], [], []
    for _ in range(MODES[mode]["steps"]):
        counter.reset()
        dist.barrier()
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        calls.append(sum(counter.calls.values()))
        gathered.append(sum(counter.bytes[n] for n in GATHERS))
    by_kind = dict(counter.calls)
    # One more step, sampling how many parameter bytes are gathered at once after every all-gather.
    params = [p for p in model.parameters() if hasattr(p, "ds_id") and not p.ds_persist]
    for p in params:
        p.bench_is_expert = False
    for n, p in model.named_parameters():
        if ".mlp.experts." in n:
            p.bench_is_expert = True
    counter.reset()
    counter.params = params
    step()
    counter.params = []
    record = {
        "variant": name,
        "step_s": statistics.median(times),
        "collectives": statistics.median(calls),
        "gathered_bytes": statistics.median(gathered),
        "peak_gathered_bytes": counter.peak_gathered,
        "peak_gathered_expert_bytes": counter.peak_gathered_experts,
        "calls_by_kind": by_kind,
        "loss": losses[-1],
        "params": sum(p.ds_numel for p in model.parameters()),
    }
    engine.destroy()
    return record


def worker(mode: str, out_path: str) -> None:
    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed's backend looks the functions up
    from moe_train.engine.distributed import destroy_distributed, hard_exit, init_distributed

    code = 0
    try:
        info = init_distributed("pytorch")
        torch.set_num_threads(1)
        records = [run_variant(mode, counter, *v, world=info.world_size) for v in variants(mode)]
        if info.rank == 0:
            Path(out_path).write_text(json.dumps(records))
        destroy_distributed()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    hard_exit(code)


def launch(mode: str, nproc: int = 2, timeout: int = 900) -> list[dict]:
    """Run the worker on `nproc` CPU ranks under torchrun; returns rank 0's records."""
    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        out = os.path.join(tmp, "records.json")
        env = cpu_ranks_env(tmp)
        cmd = [
            *torchrun_module("bench.zero3", nproc),
            "--worker",
            "--mode",
            mode,
            "--out",
            out,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"ZeRO-3 benchmark workers failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(out).read_text())


def summarise(mode: str, records: list[dict]) -> Result:
    by = {r["variant"]: r for r in records}
    ref_shard = REFERENCE_SHARD[mode]
    shard, origin, all_in_one = by[f"shard-{ref_shard}"], by["origin"], by["all-in-one"]
    n_shards = MODES[mode]["experts"] // ref_shard
    rows = [
        [
            r["variant"],
            r["step_s"] * 1e3,
            r["collectives"],
            r["gathered_bytes"] / 2**20,
            r["peak_gathered_bytes"] / 2**10,
            r["peak_gathered_expert_bytes"] / 2**10,
            origin["step_s"] / r["step_s"],
            f"{r['loss']:.5f}",
        ]
        for r in records
    ]
    figures = {
        "p2_collective_ratio": origin["collectives"] / shard["collectives"],
        "p2_step_speedup": origin["step_s"] / shard["step_s"],
        "p2_peak_gather_ratio": all_in_one["peak_gathered_bytes"] / shard["peak_gathered_bytes"],
    }
    m = MODES[mode]
    notes = (
        f"tiny model, {m['layers']} layers (first dense), {m['experts']} experts top-{m['top_k']}, "
        f"{m['tokens']} tokens per rank per step, 2 ranks on gloo, ZeRO-3 (shipped config, parameters "
        f"released after use), fp32; median of {m['steps']} steps after one warm-up. "
        f"Figures use shard-{ref_shard} "
        f"({n_shards} shards per layer); collectives per step: "
        + ", ".join(f"{r['variant']} {r['calls_by_kind']}" for r in records[:1] + [shard])
        + "."
    )
    headers = [
        "variant",
        "step ms",
        "collectives/step",
        "MiB gathered/step",
        "peak gathered KiB",
        "of it experts KiB",
        "speedup vs origin",
        "loss",
    ]
    targets = {
        "p2_collective_ratio": (">=", ref_shard),
        "p2_step_speedup": (">=", 2),
        "p2_peak_gather_ratio": (">=", n_shards),
    }
    return Result("P2 ZeRO-3 training step, 2 ranks on gloo", figures, table(headers, rows), notes, targets)


def run(mode: str = "quick") -> Result:
    return summarise(mode, launch(mode))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank (internal)")
    parser.add_argument("--mode", choices=list(MODES), default="quick", help="problem size")
    parser.add_argument("--out", help="where rank 0 writes its records (worker only)")
    args = parser.parse_args()
    if args.worker:
        worker(args.mode, args.out)
    else:
        print(run(args.mode))
