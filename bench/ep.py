"""P6 expert parallelism against ZeRO-3 shards, P7 against the peers a user would pick (2 ranks, gloo, CPU).

P6 (``--bench p6``): the P2 model (DeepSeek-V2-Lite's structure at the tiny widths) under ZeRO-3 with
shard-8 experts, against ``--ep 2`` with the same shards and with all of a rank's experts in one
shard.  Per step: bytes all-gathered and reduce-scattered from other ranks (what crosses the wire,
``(g-1)/g`` of the full tensor for a group of g), split into expert and dense parameters, bytes
all-to-all'd, collectives, step time, peak RSS above the resting state during a step, and the bytes
of parameter partitions (plus fp32 grads and Adam moments, 3x more) a rank holds.

P7 (``--bench p7``): the same weights (one seeded HF checkpoint) and the same token rows in four
engines built side by side: moe-train with ``--ep 2`` (its best configuration), moe-train under plain
ZeRO-3, transformers 5's ``DeepseekV2ForCausalLM`` (``experts_implementation`` grouped_mm, sdpa)
under ZeRO-3, and the same under ZeRO-3 + DeepSpeed AutoEP (``autoep_size`` 2, its ``deepseek_v2``
preset).  Balance loss off for all (AutoEP's layer and transformers compute none), fp32, mean cross
entropy, steps interleaved round-robin.  Reports step time, rank 0's CPU time, tokens/s per rank,
collectives and all-to-all bytes per step, peak RSS, and each engine's step-1 loss against
moe-train's.  On 4 ranks (``--nproc 4``: DP 2 x EP 2 for both EP engines) the model has 3 layers and
512 tokens per rank, so that four processes of four engines each fit the machine's 24 GiB.

Run: ``python -m bench.ep [--mode test|quick|full] [--bench p6,p7] [--nproc 2|4]``; workers run under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import Result, cpu_ranks_env, table, torchrun_module
from bench.zero3 import CollectiveCounter, model_config

P6_MODES = {
    # layers, experts, top-k, tokens per rank per step, timed steps per variant
    "test": dict(layers=2, experts=8, top_k=2, tokens=64, steps=1, shard=4),
    "quick": dict(layers=12, experts=64, top_k=6, tokens=256, steps=3, shard=8),
    "full": dict(layers=27, experts=64, top_k=6, tokens=256, steps=5, shard=8),
}
P7_MODES = {
    # the peer comparison: 6 layers, 64 experts top-6, hidden 512, 1024 tokens per rank
    "test": dict(layers=2, experts=8, top_k=2, hidden=64, moe_intermediate=32, tokens=64, steps=1),
    "quick": dict(layers=6, experts=64, top_k=6, hidden=512, moe_intermediate=128, tokens=1024, steps=2),
    "full": dict(layers=6, experts=64, top_k=6, hidden=512, moe_intermediate=128, tokens=1024, steps=5),
}
P7_4_RANKS = dict(layers=3, tokens=512)  # DP 2 x EP 2 outside the test size: four processes in 24 GiB


def _p7_mode(mode: str, world: int) -> dict:
    m = P7_MODES[mode]
    return dict(m, **P7_4_RANKS) if world > 2 and mode != "test" else m


SEND_RECV = ("send", "recv")


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


class WireCounter(CollectiveCounter):
    """CollectiveCounter that also records bytes of all-to-all by call."""

    def _wrap(self, name, original):
        inner = super()._wrap(name, original)

        def wrapper(*args, **kwargs):
            if name == "all_to_all_single" and not getattr(self._inside, "active", False):
                output = args[0] if args else kwargs["output"]
                self.bytes["all_to_all_recv"] += output.numel() * output.element_size()
            return inner(*args, **kwargs)

        return wrapper


def _param_wire_bytes(params, counts: dict[str, float], prefix: str) -> None:
    """Bytes a parameter's gather / gradient reduce-scatter moves from other ranks: (g-1)/g of it."""
    for p in params:
        g = _group_size(p.ds_process_group)
        moved = p.ds_numel * p.element_size() * (g - 1) / g
        kind = "expert" if p.bench_is_expert else "dense"
        counts[f"{prefix}_{kind}"] = counts.get(f"{prefix}_{kind}", 0.0) + moved


def _instrument_gathers(model, counts: dict[str, float]) -> None:
    """Wrap every ZeRO-3 parameter's coalesced all-gather to count what it fetches, by kind."""
    for name, p in model.named_parameters():
        p.bench_is_expert = ".mlp.experts." in name
        if not hasattr(p, "all_gather_coalesced") or getattr(p, "bench_wrapped", False):
            continue
        original = p.all_gather_coalesced

        def wrapped(params, *args, _original=original, **kwargs):
            fetch = [q for q in params if q.ds_status.name == "NOT_AVAILABLE"]
            _param_wire_bytes(fetch, counts, "gathered")
            return _original(params, *args, **kwargs)

        p.all_gather_coalesced = wrapped
        p.bench_wrapped = True


def _ds_config(world: int, hidden: int):
    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config

    ds = fill_auto(
        load_deepspeed_config("deepspeed_zero3"),
        micro_batch_size=1,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        bf16=False,
        hidden_size=hidden,
    )
    # Release parameters after use, as for a model far above the shipped thresholds (as P2 does).
    ds["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
    return ds


def _ours(model_and_layout, ds, ep: int, source: str | None, hold: bool = False):
    """moe-train's model partitioned as the trainer builds it, in a DeepSpeed engine (``hold``:
    ``--hold-experts``)."""
    from moe_train.engine.model import build_model
    from moe_train.parallel import ParallelDims, zero3

    cfg, layout = model_and_layout
    dims = ParallelDims(dist.get_world_size(), 1, ep, dist.get_rank(), hold)
    dims.validate(cfg, layout, ds)
    dims.create_groups()
    model = build_model(
        cfg, layout, dims, ds, torch.float32, torch.device("cpu"), source, seed=0, activation_checkpointing=False
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _ = zero3.initialize(model, optimizer, None, ds)  # as the trainer: its post-initialize steps too
    return engine


def _row(tokens: int, rank: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, vocab, (1, tokens), generator=g)


def _our_step(engine, ids: torch.Tensor):
    from moe_train.models.common.loss import causal_lm_loss

    def step() -> float:
        out = engine(ids, cu_seqlens=torch.tensor([0, ids.shape[1]], dtype=torch.int32))
        loss = causal_lm_loss(out.logits, ids)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def _partition_bytes(engine) -> int:
    return sum(p.ds_tensor.numel() * p.element_size() for p in engine.module.parameters())


def _timed_rounds(steps: dict, rounds: int, counter: CollectiveCounter | None = None):
    """Round-robin over the variants (reversed every other round); per variant: times, losses,
    collective calls, all-to-all bytes and peak RSS above the start of each step."""
    from moe_train.engine.memory import PeakRSS

    rec = {name: {"times": [], "cpu": [], "losses": [], "calls": [], "a2a": [], "rss": []} for name in steps}
    for name, step in steps.items():  # warm-up: DeepSpeed traces the module order on the first step
        rec[name]["first_loss"] = step()
    order = list(steps)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            if counter is not None:
                counter.reset()
            dist.barrier()
            with PeakRSS() as rss:
                t0, c0 = time.perf_counter(), time.process_time()
                loss = steps[name]()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            rec[name]["times"].append(dt)
            rec[name]["cpu"].append(cpu)
            rec[name]["losses"].append(loss)
            rec[name]["rss"].append(rss.peak_delta)
            if counter is not None:
                rec[name]["calls"].append(sum(v for k, v in counter.calls.items()))
                rec[name]["a2a"].append(counter.bytes["all_to_all_recv"])
    return rec


# ------------------------------------------------------------------ P6
def p6_worker(mode: str, counter: WireCounter) -> list[dict]:
    m = P6_MODES[mode]
    world = dist.get_world_size()
    variants = {
        f"zero3 shard-{m['shard']}": (1, m["shard"]),
        f"ep2 shard-{m['shard']}": (2, m["shard"]),
        f"ep2 shard-{m['experts'] // 2}": (2, m["experts"] // 2),
    }
    engines, steps, counts = {}, {}, {}
    for name, (ep, shard) in variants.items():
        cfg, layout = model_config(mode, "shard", shard)  # P2's model
        engine = _ours((cfg, layout), _ds_config(world, cfg.hidden_size), ep, None)
        counts[name] = {}
        _instrument_gathers(engine.module, counts[name])
        engines[name] = engine
        steps[name] = _our_step(engine, _row(m["tokens"], dist.get_rank(), cfg.vocab_size))
    rec = _timed_rounds(steps, m["steps"], counter)
    out = []
    for name, engine in engines.items():
        for k in list(counts[name]):
            counts[name][k] /= m["steps"] + 1  # counted over the warm-up and every timed step
        params = list(engine.module.parameters())
        reduced: dict[str, float] = {}
        _param_wire_bytes(params, reduced, "reduce_scattered")
        r = rec[name]
        out.append(
            {
                "variant": name,
                "step_s": statistics.median(r["times"]),
                "cpu_s": statistics.median(r["cpu"]),
                "collectives": statistics.median(r["calls"]),
                "a2a_bytes": statistics.median(r["a2a"]),
                "peak_rss": max(r["rss"]),
                "partition_bytes": _partition_bytes(engine),
                "loss": r["first_loss"],
                **counts[name],
                **reduced,
            }
        )
    for engine in engines.values():
        engine.destroy()
    return out


def p6_summary(mode: str, records: list[dict], nproc: int) -> Result:
    m = P6_MODES[mode]
    by = {r["variant"]: r for r in records}
    z3, ep, ep_one = (
        by[f"zero3 shard-{m['shard']}"],
        by[f"ep2 shard-{m['shard']}"],
        by[f"ep2 shard-{m['experts'] // 2}"],
    )
    MiB = 2**20
    rows = [
        [
            r["variant"],
            r["step_s"] * 1e3,
            r["cpu_s"] * 1e3,
            z3["step_s"] / r["step_s"],
            r["collectives"],
            r.get("gathered_expert", 0) / MiB,
            r.get("gathered_dense", 0) / MiB,
            r.get("reduce_scattered_expert", 0) / MiB,
            r.get("reduce_scattered_dense", 0) / MiB,
            r["a2a_bytes"] / MiB,
            r["peak_rss"] / MiB,
            r["partition_bytes"] / MiB,
            f"{r['loss']:.6f}",
        ]
        for r in records
    ]
    best = min((ep, ep_one), key=lambda r: r["step_s"])
    figures = {
        # inf: EP gathers no expert bytes at all (an expert-data-parallel group of one rank)
        f"p6_expert_gather_cut_{nproc}r": (
            z3.get("gathered_expert", 0) / ep["gathered_expert"] if ep.get("gathered_expert") else float("inf")
        ),
        f"p6_step_speedup_{nproc}r": z3["step_s"] / best["step_s"],
        f"p6_cpu_speedup_{nproc}r": z3["cpu_s"] / min(ep["cpu_s"], ep_one["cpu_s"]),
        f"p6_step1_loss_diff_{nproc}r": max(abs(r["loss"] - z3["loss"]) for r in records),
    }
    headers = [
        "variant",
        "step ms",
        "CPU ms (rank 0)",
        "speedup",
        "collectives/step",
        "expert MiB gathered",
        "dense MiB gathered",
        "expert MiB reduce-scattered",
        "dense MiB reduce-scattered",
        "MiB all-to-all recv",
        "peak RSS MiB (step)",
        "partitions MiB",
        "step-1 loss",
    ]
    notes = (
        f"P2 model: {m['layers']} layers (first dense), {m['experts']} experts top-{m['top_k']}, hidden 64, "
        f"{m['tokens']} tokens per rank per step, {nproc} ranks on gloo, ZeRO-3 (parameters released after "
        f"use), fp32; median of {m['steps']} interleaved steps after one warm-up. Bytes are what crosses the "
        "wire per rank per step ((g-1)/g of each gathered or reduce-scattered tensor; gathers counted per "
        "fetched parameter); an expert-data-parallel group of one rank moves nothing (cut: inf). CPU ms: "
        "rank 0's process time (all its threads), steadier than wall time on a loaded machine."
    )
    targets = {
        f"p6_expert_gather_cut_{nproc}r": (">=", 2),
        f"p6_step_speedup_{nproc}r": (">=", 1.5),
        f"p6_step1_loss_diff_{nproc}r": ("<=", 1e-6),
    }
    if nproc > 2:
        targets.pop(f"p6_step_speedup_{nproc}r")
    return Result(f"P6 EP vs ZeRO-3 shards, {nproc} ranks on gloo", figures, table(headers, rows), notes, targets)


# ------------------------------------------------------------------ P7
def _p7_config(mode: str, world: int, expert_in_one_shard: int | None = None):
    """(config, expert layout) of P7's model on ``world`` ranks."""
    from moe_train.models.common.experts import ExpertLayout
    from moe_train.models.deepseek_v2.config import DeepseekV2Config

    m = _p7_mode(mode, world)
    cfg = DeepseekV2Config.from_name(
        "tiny",
        num_hidden_layers=m["layers"],
        n_routed_experts=m["experts"],
        num_experts_per_tok=m["top_k"],
        hidden_size=m["hidden"],
        moe_intermediate_size=m["moe_intermediate"],
        intermediate_size=4 * m["hidden"],
        q_lora_rank=None,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        aux_loss_alpha=0.0,
    )
    return cfg, ExpertLayout("shard", expert_in_one_shard)


def _hf_engine(source: str, world: int, hidden: int, autoep: int):
    import deepspeed
    from transformers import AutoModelForCausalLM

    ds = _ds_config(world, hidden)
    if autoep > 1:
        ds["expert_parallel"] = {"enabled": True, "autoep_size": autoep, "preset_model": "deepseek_v2"}
    # Loaded whole on every rank (tiny), then partitioned by deepspeed.initialize: AutoEP must build
    # its expert layers itself, outside zero.Init.
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch.float32,
        attn_implementation="sdpa",
        experts_implementation="grouped_mm",
        trust_remote_code=False,
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    return engine


def _hf_step(engine, ids: torch.Tensor):
    def step() -> float:
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        engine.backward(out.loss)
        engine.step()
        return out.loss.item()

    return step


HOLD = "moe-train --ep 2 --hold-experts"


def p7_worker(mode: str, source: str, counter: WireCounter) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    m = _p7_mode(mode, world)
    shard_ep = m["experts"] // 2  # a rank's experts in one shard: the fastest EP layout in P6
    ep_config = _p7_config(mode, world, expert_in_one_shard=shard_ep)
    ours_ep = _ours(ep_config, _ds_config(world, m["hidden"]), 2, source)
    ours_z3 = _ours(
        _p7_config(mode, world, expert_in_one_shard=8 if m["experts"] >= 8 else 1),
        _ds_config(world, m["hidden"]),
        1,
        source,
    )
    hf_z3 = _hf_engine(source, world, m["hidden"], 1)
    hf_ep = _hf_engine(source, world, m["hidden"], 2)
    engines = [ours_ep, ours_z3, hf_z3, hf_ep]
    ids = _row(m["tokens"], rank, 512)
    steps = {
        "moe-train --ep 2": _our_step(ours_ep, ids),
        "moe-train zero3": _our_step(ours_z3, ids),
        "transformers zero3": _hf_step(hf_z3, ids),
        "transformers zero3+autoep2": _hf_step(hf_ep, ids),
    }
    if world > 2:  # expert-data-parallel groups of world / 2 ranks: --hold-experts changes what is gathered
        engines.append(_ours(ep_config, _ds_config(world, m["hidden"]), 2, source, hold=True))
        steps[HOLD] = _our_step(engines[-1], ids)
    rec = _timed_rounds(steps, m["steps"], counter)
    losses = torch.tensor([[rec[n]["first_loss"] for n in steps]])
    dist.all_reduce(losses)  # step-1 loss of the global batch: mean over the ranks' rows
    out = []
    for i, name in enumerate(steps):
        r = rec[name]
        out.append(
            {
                "variant": name,
                "step_s": statistics.median(r["times"]),
                "cpu_s": statistics.median(r["cpu"]),
                "peak_rss": max(r["rss"]),
                "collectives": statistics.median(r["calls"]),
                "a2a_bytes": statistics.median(r["a2a"]),
                "tokens_per_s": m["tokens"] / statistics.median(r["times"]),
                "loss": losses[0, i].item() / world,
            }
        )
    for engine in engines:
        engine.destroy()
    return out


def p7_summary(mode: str, records: list[dict], nproc: int) -> Result:
    m = _p7_mode(mode, nproc)
    by = {r["variant"]: r for r in records}
    ours = by["moe-train --ep 2"]
    rows = [
        [
            r["variant"],
            r["step_s"] * 1e3,
            r["cpu_s"] * 1e3,
            r["tokens_per_s"],
            ours["tokens_per_s"] / r["tokens_per_s"],
            r["collectives"],
            r["a2a_bytes"] / 2**20,
            r["peak_rss"] / 2**20,
            f"{r['loss']:.7f}",
            abs(r["loss"] - ours["loss"]),
        ]
        for r in records
    ]
    figures = {
        "p7_vs_hf_zero3": by["transformers zero3"]["step_s"] / ours["step_s"],
        "p7_vs_hf_autoep": by["transformers zero3+autoep2"]["step_s"] / ours["step_s"],
        "p7_vs_ours_zero3": by["moe-train zero3"]["step_s"] / ours["step_s"],
        "p7_step1_loss_diff": max(abs(r["loss"] - ours["loss"]) for r in records),
        "p7_cpu_vs_hf_zero3": by["transformers zero3"]["cpu_s"] / ours["cpu_s"],
        "p7_cpu_vs_hf_autoep": by["transformers zero3+autoep2"]["cpu_s"] / ours["cpu_s"],
    }
    if HOLD in by:  # the same engine holding its experts between forward and step (DP x EP only)
        figures["p7_hold_vs_hf_autoep"] = by["transformers zero3+autoep2"]["step_s"] / by[HOLD]["step_s"]
        figures["p7_hold_vs_hf_zero3"] = by["transformers zero3"]["step_s"] / by[HOLD]["step_s"]
        figures["p7_hold_vs_ep2"] = ours["step_s"] / by[HOLD]["step_s"]
    headers = [
        "engine",
        "step ms",
        "CPU ms (rank 0)",
        "tokens/s per rank",
        "moe-train --ep 2 speedup",
        "collectives/step",
        "MiB all-to-all recv (rank 0)",
        "peak RSS MiB (step)",
        "step-1 loss",
        "|loss - ours|",
    ]
    notes = (
        f"same seeded HF checkpoint and token rows for all: {m['layers']} layers (first dense), "
        f"{m['experts']} experts top-{m['top_k']}, hidden {m['hidden']}, expert intermediate "
        f"{m['moe_intermediate']}, {m['tokens']} tokens per rank per step, {nproc} ranks on gloo "
        f"({'EP 2' if nproc == 2 else f'DP {nproc // 2} x EP 2'} for the EP engines), ZeRO-3 "
        f"(parameters released after use), fp32, balance loss off; median of {m['steps']} interleaved "
        "steps after one warm-up. transformers: experts_implementation grouped_mm, sdpa attention; "
        "AutoEP: autoep_size 2, preset deepseek_v2. moe-train --ep 2 keeps a rank's "
        f"{m['experts'] // 2} experts in one shard (and, at DP x EP, the same engine with --hold-experts: its "
        "local experts gathered once per step, kept from forward to the optimizer step); moe-train zero3 uses "
        "shard-8. CPU ms: rank 0's process "
        "time (all its threads), steadier than wall time on a loaded machine."
    )
    targets = {"p7_vs_hf_zero3": (">=", 2), "p7_vs_hf_autoep": (">=", 1.3), "p7_step1_loss_diff": ("<=", 1e-5)}
    title = f"P7 moe-train vs transformers 5 (+ AutoEP), {nproc} ranks on gloo"
    return Result(title, figures, table(headers, rows), notes, targets)


def _write_checkpoint(mode: str, world: int, path: str) -> None:
    """One seeded HF checkpoint that every P7 engine loads."""
    from moe_train.checkpoint.hf_layout import load_into, save_pretrained
    from moe_train.engine.weights import SeededInit
    from moe_train.models import spec_of

    cfg, layout = _p7_config(mode, world)
    with torch.device("meta"):
        model = spec_of(cfg).build(cfg, layout)
    model = model.to_empty(device="cpu")
    load_into(model, SeededInit(model, seed=0))
    save_pretrained(model, path)


# ------------------------------------------------------------------ launch
def worker(mode: str, which: list[str], out_path: str, tmp: str) -> None:
    counter = WireCounter()
    counter.install()  # before DeepSpeed's backend looks the functions up
    from moe_train.engine.distributed import destroy_distributed, hard_exit, init_distributed

    code = 0
    try:
        info = init_distributed("pytorch")
        torch.set_num_threads(1)
        results: dict[str, list[dict]] = {}
        if "p6" in which:
            results["p6"] = p6_worker(mode, counter)
        if "p7" in which:
            source = os.path.join(tmp, "p7_checkpoint")
            if info.rank == 0:
                _write_checkpoint(mode, info.world_size, source)
            dist.barrier()
            results["p7"] = p7_worker(mode, source, counter)
        if info.rank == 0:
            Path(out_path).write_text(json.dumps(results))
        destroy_distributed()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    hard_exit(code)


def launch(mode: str, which: list[str], nproc: int = 2, timeout: int = 1800) -> dict[str, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="bench-ep-") as tmp:
        out = os.path.join(tmp, "records.json")
        env = cpu_ranks_env(tmp)
        cmd = [
            *torchrun_module("bench.ep", nproc),
            "--worker",
            "--mode",
            mode,
            "--bench",
            ",".join(which),
            "--out",
            out,
            "--tmp",
            tmp,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"EP benchmark workers failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(Path(out).read_text())


def run(mode: str = "quick", which: tuple[str, ...] = ("p6", "p7"), nproc: int = 2) -> list[Result]:
    records = launch(mode, list(which), nproc)
    out = []
    if "p6" in records:
        out.append(p6_summary(mode, records["p6"], nproc))
    if "p7" in records:
        out.append(p7_summary(mode, records["p7"], nproc))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank (internal)")
    parser.add_argument("--mode", choices=list(P6_MODES), default="quick", help="problem size")
    parser.add_argument("--bench", default="p6,p7", help="p6, p7 or both")
    parser.add_argument("--nproc", type=int, default=2, help="ranks: 2 (EP 2) or 4 (DP 2 x EP 2)")
    parser.add_argument("--out", help="where rank 0 writes its records (worker only)")
    parser.add_argument("--tmp", help="scratch directory shared by the ranks (worker only)")
    args = parser.parse_args()
    which = [b.strip() for b in args.bench.split(",") if b.strip()]
    if args.worker:
        worker(args.mode, which, args.out, args.tmp)
    else:
        t0 = time.perf_counter()
        for result in run(args.mode, tuple(which), args.nproc):
            print(result)
        print(f"(took {time.perf_counter() - t0:.0f} s)")
