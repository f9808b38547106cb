"""One-step cProfile of P7's EP engines on every rank: where a step of moe-train ``--ep 2`` and of
DeepSpeed AutoEP goes (GEMMs, ZeRO-3 hooks, waits, copies), with collectives and all-to-all bytes.

Builds P7's model (``bench/ep.py``; 3 layers and 512 tokens per rank on 4 ranks), runs two warm-up
steps per engine, then one profiled step per engine and round, interleaved, and writes each rank's
top functions by own time and by cumulative time to ``OUT/{engine}_r{rank}.txt``.

Run: ``python -m bench.ep_profile --nproc 2 --out /tmp/ep-profile`` (``--engines ours,hold,autoep``;
``--timer cpu`` times each function by process time instead of wall time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from bench import ep
from bench.common import cpu_ranks_env, torchrun_module

ROUNDS = 2  # profiled steps per engine; the last one is written out


# Where a step's time goes, in disjoint parts of the profile (own time of the kernels; cumulative time of
# DeepSpeed's entry points, which contain no GEMM); "other" is the rest: Python, autograd Functions,
# elementwise kernels, routing, the all-to-all.
GEMM_KERNELS = ("_grouped_mm", "'matmul'", "scaled_dot_product_attention", "'mm'", "bmm", "addmm", "._nn.linear")
ENTRY_POINTS = {
    "optimizer step (Adam, DeepSpeed's flatten and norm)": ("stage3.py", "step"),
    "gradient reduce-scatter": ("stage3.py", "reduce_ready_partitions_and_remove_grads"),
    "ZeRO-3 fetch": ("partitioned_param_coordinator.py", "fetch_sub_module"),
    "ZeRO-3 release": ("partitioned_param_coordinator.py", "release_sub_module"),
    "held experts' gathers (ours)": ("zero3.py", "_fetch_whole"),
}


def breakdown(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of one profiled step by part (see ENTRY_POINTS); the parts add up to the total."""
    own = {k: v[2] for k, v in stats.stats.items()}
    cum = {k: v[3] for k, v in stats.stats.items()}
    out = {
        "GEMMs and attention kernels (forward; ours' backward GEMMs too)": sum(
            t for (f, _, name), t in own.items() if f == "~" and any(g in name for g in GEMM_KERNELS)
        )
    }
    out["autograd engine (C++ backward kernels: AutoEP's expert GEMM backward, elementwise)"] = sum(
        t for (f, _, name), t in own.items() if "run_backward" in name
    )
    for part, (file, name) in ENTRY_POINTS.items():
        out[part] = sum(t for (f, _, n), t in cum.items() if f.endswith(file) and n == name)
    out["other (Python, autograd Functions, elementwise, routing, all-to-all)"] = stats.total_tt - sum(out.values())
    return out


def worker(mode: str, engines: list[str], out: str, timer: str = "wall") -> None:
    counter = ep.WireCounter()
    counter.install()  # before DeepSpeed's backend looks the functions up
    from moe_train.engine.distributed import hard_exit, init_distributed

    info = init_distributed("pytorch")
    torch.set_num_threads(1)
    world, rank = info.world_size, info.rank
    m = ep._p7_mode(mode, world)
    source = os.path.join(out, "checkpoint")
    if rank == 0:
        ep._write_checkpoint(mode, world, source)
    dist.barrier()
    ids = ep._row(m["tokens"], rank, 512)
    steps = {}
    cfg = ep._p7_config(mode, world, expert_in_one_shard=m["experts"] // 2)
    for name, hold in (("ours", False), ("hold", True)):  # hold: --ep 2 --hold-experts
        if name in engines:
            engine = ep._ours(cfg, ep._ds_config(world, m["hidden"]), 2, source, hold=hold)
            steps[name] = ep._our_step(engine, ids)
    if "autoep" in engines:
        steps["autoep"] = ep._hf_step(ep._hf_engine(source, world, m["hidden"], 2), ids)
    for step in steps.values():
        step(), step()
    for r in range(ROUNDS):
        for name, step in steps.items():
            counter.reset()
            dist.barrier()
            # CPU time attributes a step to what this process computes, not to the waits while the
            # other ranks run on the same cores (4 processes on 2 cores)
            profile = cProfile.Profile(time.process_time) if timer == "cpu" else cProfile.Profile()
            t0, c0 = time.perf_counter(), time.process_time()
            profile.enable()
            step()
            profile.disable()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            calls = dict(counter.calls)
            a2a = counter.bytes["all_to_all_recv"] / 2**20
            print(f"rank {rank} {name} round {r}: wall {wall:.2f} s, CPU {cpu:.2f} s, {calls}, a2a {a2a:.1f} MiB")
            if r == ROUNDS - 1:
                text = io.StringIO()
                profile.dump_stats(os.path.join(out, f"{name}_r{rank}.prof"))  # for pstats / snakeviz
                stats = pstats.Stats(profile, stream=text)
                stats.sort_stats("tottime").print_stats(30)
                stats.sort_stats("cumtime").print_stats(40)
                with open(os.path.join(out, f"{name}_r{rank}.txt"), "w") as f:
                    f.write(f"wall {wall:.3f} s, CPU {cpu:.3f} s, collectives {calls}, a2a {a2a:.1f} MiB\n")
                    f.write(text.getvalue())
                    f.write("\nwhere the step went (s):\n")
                    for part, t in breakdown(pstats.Stats(profile)).items():
                        f.write(f"  {t:7.3f}  {part}\n")
    dist.barrier()
    hard_exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank (internal)")
    parser.add_argument("--mode", choices=list(ep.P7_MODES), default="quick", help="problem size")
    parser.add_argument("--nproc", type=int, default=2, help="ranks: 2 (EP 2) or 4 (DP 2 x EP 2)")
    parser.add_argument("--engines", default="ours,autoep", help="any of ours, hold (ours with --hold-experts), autoep")
    parser.add_argument("--out", required=True, help="directory for the per-rank profiles")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall", help="what the profile times")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.worker:
        worker(args.mode, engines, args.out, args.timer)
    else:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="bench-ep-profile-") as tmp:
            cmd = [*torchrun_module("bench.ep_profile", args.nproc), "--worker", "--mode", args.mode]
            cmd += ["--engines", ",".join(engines), "--out", args.out, "--timer", args.timer]
            sys.exit(subprocess.run(cmd, env=cpu_ranks_env(tmp)).returncode)
