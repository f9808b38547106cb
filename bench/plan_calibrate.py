"""Calibrate the planner's speed model (``moe_train/plan/calibration.py``).

``--measure``: on this machine, 2 CPU ranks on gloo: a sweep of all-gather and reduce-scatter
sizes (time per call against bytes: alpha and beta), a single-thread matmul rate, and the P2
ZeRO-3 variants (``bench/zero3.py``, quick mode) ``--repeats`` times; the medians go to
``moe_train/plan/cpu_measurements.json`` with the CPU constants fitted on them.  The machine is
shared and noisy: every figure is a median over repeats, and the raw runs are kept.

``--fit-seed``: fit the A100 constants on XTuner's table (``calibration.SEED_TABLE``) and print
the fit and its leave-one-out errors.

Run as ``python -m bench.plan_calibrate --measure`` or ``--fit-seed``; ``--worker`` is the
torchrun side of the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import torchrun_module

SWEEP_NUMEL = [2**8, 2**12, 2**15, 2**18, 2**20]
OUT = Path(__file__).resolve().parent.parent / "moe_train" / "plan" / "cpu_measurements.json"


# ---------------------------------------------------------------------------- measurements
def sweep_worker(out_path: str) -> None:
    """Time all_gather_into_tensor and reduce_scatter_tensor of each size (fp32), median per call."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    records = []
    for numel in SWEEP_NUMEL:
        part = torch.randn(numel // world)
        full = torch.empty(numel)
        reps = max(5, min(200, 2**22 // numel))
        for op in ("all_gather", "reduce_scatter"):
            times = []
            for _ in range(3):  # three rounds of reps, the median round
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(reps):
                    if op == "all_gather":
                        dist.all_gather_into_tensor(full, part)
                    else:
                        dist.reduce_scatter_tensor(part, full)
                times.append((time.perf_counter() - t0) / reps)
            records.append({"op": op, "numel": numel, "bytes": numel * 4, "s_per_call": statistics.median(times)})
    if rank == 0:
        Path(out_path).write_text(json.dumps(records))
    dist.destroy_process_group()


def run_sweep(nproc: int = 2) -> list[dict]:
    from bench.zero3 import launch  # noqa: F401  (same environment rules as P2)

    with tempfile.TemporaryDirectory(prefix="plan-sweep-") as tmp:
        out = os.path.join(tmp, "sweep.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
        )

        subprocess.run(
            [
                *torchrun_module("bench.plan_calibrate", nproc),
                "--worker",
                "--out",
                out,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        return json.loads(Path(out).read_text())


def matmul_rate() -> float:
    """FLOP/s of one thread on a 256 x 256 x 256 fp32 matmul (median of 5 rounds)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            a @ b
        rates.append(200 * 2 * 256**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


# ---------------------------------------------------------------------------- fitting
def nelder_mead(f, x0: list[float], steps: list[float], iters: int = 300) -> list[float]:
    """Minimise f from x0 (a small Nelder-Mead; the fits have 2-4 constants)."""
    pts = [list(x0)] + [[x + (s if i == j else 0) for j, x in enumerate(x0)] for i, s in enumerate(steps)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(len(pts)), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centroid = [sum(p[j] for p in pts[:-1]) / (len(pts) - 1) for j in range(len(x0))]
        worst = pts[-1]
        refl = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(refl)
        if fr < vals[0]:
            exp = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0]] + [[b + 0.5 * (p - b) for b, p in zip(pts[0], q)] for q in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(len(pts)), key=vals.__getitem__)]


P2_VARIANTS = ("origin", "shard-8", "all-in-one")  # origin+leaf: the planner has no leaf-module layout


def p2_measured() -> dict[str, float]:
    """Median step time of each P2 variant over the committed runs."""
    from moe_train.plan.calibration import cpu_measurements

    runs = cpu_measurements()["p2_quick_runs"]
    return {v: statistics.median(r["step_s"] for run in runs for r in run if r["variant"] == v) for v in P2_VARIANTS}


def p2_predicted(constants: dict[str, float] | None = None) -> dict[str, object]:
    """The speed model's estimate of each P2 variant (quick mode, 2 ranks) with the CPU calibration,
    or with ``constants`` (gemm_efficiency, hook_s) in place of the fitted ones."""
    return p2_predicted_mode("quick", constants)


def p2_predicted_mode(mode: str, constants: dict[str, float] | None = None) -> dict[str, object]:
    """``p2_predicted`` for any P2 mode, every variant but origin+leaf."""
    from bench.zero3 import MODES, model_config, variants
    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config
    from moe_train.plan.calibration import cpu_calibration
    from moe_train.plan.memory import Workload, ZeroSettings
    from moe_train.plan.speed import Device, predict_speed

    cal, figures = cpu_calibration()
    if constants:
        cal = dataclasses.replace(
            cal,
            flash_efficiency=constants["gemm_efficiency"],
            eager_efficiency=constants["gemm_efficiency"],
            **constants,
        )
    device = Device(
        "CPU (gloo)",
        peak_tflops=figures["peak_tflops"],
        hbm_gbps=figures["memory_gbps"],
        nvlink_gbps=figures["link_gbps"],
        network_gbps=figures["link_gbps"],
        calibration=cal,
    )
    out = {}
    for name, impl, shard, leaf in variants(mode):
        if leaf or (mode == "quick" and name not in P2_VARIANTS):
            continue
        cfg, layout = model_config(mode, impl, shard)
        ds = fill_auto(
            load_deepspeed_config("deepspeed_zero3"),
            micro_batch_size=1,
            grad_accum=1,
            world_size=2,
            grad_clip=1.0,
            bf16=False,
            hidden_size=cfg.hidden_size,
        )
        ds["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0)  # as P2 runs it
        work = Workload(
            max_length=MODES[mode]["tokens"],
            attention="sdpa",
            dtype="fp32",
            device="cpu",
            activation_checkpointing=False,
        )
        out[name] = predict_speed(cfg, layout, work, ZeroSettings.from_ds_config(ds, cfg.hidden_size), 2, 1, device)
    return out


def fit_cpu(skip: str | None = None) -> dict[str, float]:
    """GEMM efficiency and hook time minimising the squared log error of the P2 step times."""
    measured = p2_measured()
    keys = ("gemm_efficiency", "hook_s")

    def loss(x):
        pred = p2_predicted(dict(zip(keys, map(math.exp, x))))
        return sum(math.log(pred[v].step_s / measured[v]) ** 2 for v in P2_VARIANTS if v != skip)

    return dict(zip(keys, map(math.exp, nelder_mead(loss, [math.log(0.05), math.log(5e-4)], [0.5, 0.5], iters=80))))


SEED_CONSTANTS = ("gemm_efficiency", "flash_efficiency", "hook_s", "network_gbps")


def seed_predictions(constants: dict[str, float]) -> list[float | None]:
    """Predicted TGS of each seed row with ``constants`` in place of the A100 calibration."""
    from moe_train.plan import calibration, seed_row_inputs, speed

    constants = dict(constants)
    network = constants.pop("network_gbps", speed.DEVICES["a100"].network_gbps)
    cal = dataclasses.replace(calibration.A100, **constants, eager_efficiency=constants["gemm_efficiency"])
    dev = dataclasses.replace(speed.DEVICES["a100"], calibration=cal, network_gbps=network)
    out = []
    for row in calibration.SEED_TABLE:
        cfg, layout, work, zero, grad_accum = seed_row_inputs(*row[:3])
        if row[3] is None:
            out.append(None)
            continue
        out.append(speed.predict_speed(cfg, layout, work, zero, 128, 16, dev, grad_accum).tgs)
    return out


def _to_constants(x: list[float]) -> dict[str, float]:
    """Unconstrained fit variables -> constants: efficiencies in (0, 1), the rest positive."""

    def eff(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    return {
        "gemm_efficiency": eff(x[0]),
        "flash_efficiency": eff(x[1]),
        "hook_s": math.exp(x[2]),
        "network_gbps": math.exp(x[3]),
    }


def fit_seed(skip: int | None = None, starts: tuple[float, ...] = (1e-5, 5e-4), iters: int = 100) -> dict[str, float]:
    """The A100 constants minimising the squared log error over the seed rows (all but ``skip``),
    best of two starts: host time per parameter small (latency explains origin) and large."""
    from moe_train.plan import calibration

    measured = [r[3] for r in calibration.SEED_TABLE]

    def loss(x):
        pred = seed_predictions(_to_constants(x))
        return sum(math.log(p / m) ** 2 for i, (p, m) in enumerate(zip(pred, measured)) if m and i != skip)

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    fits = [
        nelder_mead(loss, [logit(0.12), logit(0.45), math.log(h), math.log(30.0)], [0.3] * 4, iters=iters)
        for h in starts
    ]
    return _to_constants(min(fits, key=loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="measure the CPU calibration (minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="P2 runs to take the median of")
    parser.add_argument("--fit-cpu", action="store_true", help="fit the CPU constants on the committed P2 runs")
    parser.add_argument("--fit-seed", action="store_true", help="fit the A100 constants on the seed table")
    parser.add_argument("--worker", action="store_true", help="torchrun side of the sweep (internal)")
    parser.add_argument("--out", help="sweep output (worker only)")
    args = parser.parse_args()
    if args.worker:
        sweep_worker(args.out)
    elif args.measure:
        from bench.zero3 import launch

        sweep = run_sweep()
        rate = matmul_rate()
        runs = [launch("quick") for _ in range(args.repeats)]
        previous = json.loads(OUT.read_text()) if OUT.exists() else {}
        OUT.write_text(
            json.dumps(
                {
                    "note": "2 CPU ranks on gloo, 1 thread each, measured by bench/plan_calibrate.py --measure",
                    "world_size": 2,
                    "sweep": sweep,
                    "matmul_flops": rate,
                    "p2_quick_runs": runs,
                    "fitted": previous.get("fitted", {"gemm_efficiency": 0.02, "hook_s": 1e-3}),
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {OUT}; now refit with --fit-cpu")
    elif args.fit_cpu:
        m = json.loads(OUT.read_text())
        m["fitted"] = fit_cpu()
        m["leave_one_out"] = {v: fit_cpu(skip=v) for v in P2_VARIANTS}
        OUT.write_text(json.dumps(m, indent=1) + "\n")
        measured, pred = p2_measured(), p2_predicted()
        for v in P2_VARIANTS:
            loo = p2_predicted(m["leave_one_out"][v])[v].step_s
            print(
                f"{v}: measured {measured[v] * 1e3:.0f} ms, predicted {pred[v].step_s * 1e3:.0f} ms, "
                f"left out {loo * 1e3:.0f} ms"
            )
        print("fitted:", m["fitted"])
    elif args.fit_seed:
        from moe_train.plan import calibration

        best = fit_seed()
        print("fit:", {k: float(f"{v:.3g}") for k, v in best.items()}, flush=True)
        for row, pred in zip(calibration.SEED_TABLE, seed_predictions(best)):
            print(row, pred, flush=True)
        for i, row in enumerate(calibration.SEED_TABLE):
            if row[3] is None:
                continue
            loo = fit_seed(skip=i, starts=(5e-4,), iters=60)
            print(
                "leave out",
                i,
                row,
                "->",
                round(seed_predictions(loo)[i], 1),
                {k: float(f"{v:.3g}") for k, v in loo.items()},
                flush=True,
            )


if __name__ == "__main__":
    main()
