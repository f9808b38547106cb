"""The few constants of the speed model, each with where it came from.

Two kinds: physical facts of a device (peak FLOP/s, link bandwidths), taken from data sheets, and
free constants (how much of the peak the kernels reach, the host time ZeRO-3 spends per parameter
per module call, and for the A100 the seed cluster's effective bandwidth between nodes), fitted
on measurements; the latency of one ring step is assumed for the GPUs and measured on CPU:

* A100: XTuner's published table for DeepSeek-V2 236B on 128 A100-80G (``SEED_TABLE``), by
  ``bench/plan_calibrate.py --fit-seed`` (least squares on log TGS; the leave-one-out errors are
  asserted by ``tests/test_plan.py``).
* CPU (2 ranks on gloo): the collective sweep and the P2 ZeRO-3 variants measured on the 2-core
  development machine by ``bench/plan_calibrate.py``, kept in ``cpu_measurements.json``.

H100 and H200 have no published MoE ZeRO-3 table to fit on: they reuse the A100 efficiencies and
host costs with their own data-sheet peaks and links, and every report says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources

# Alpaca sample lengths in tokens under the DeepSeek V2 template: log-normal, median 150,
# sigma 0.7, the alpaca-like distribution bench/packing.py draws (mean ~190, 1% over 750).  With varlen a token attends
# to the earlier tokens of its own sample: E[s^2] / (2 E[s]) keys on average, 156 here, against
# max_length / 2 over a whole packed row without varlen.
ALPACA_LOG_MEDIAN_TOKENS = 150
ALPACA_LOG_SIGMA = 0.7
ALPACA_SAMPLES = 52002  # tatsu-lab/alpaca's train split


@dataclass(frozen=True)
class Calibration:
    """Free constants of one device; ``source`` says where they were fitted or measured."""

    gemm_efficiency: float  # share of peak of the matmuls (attention projections, experts, lm_head)
    flash_efficiency: float  # share of peak of the flash-attention kernels (forward and backward)
    eager_efficiency: float  # share of peak of HF eager attention (S x S matmuls, fp32 softmax)
    ring_step_latency_s: float  # alpha: one step of a ring collective (N - 1 steps per collective)
    hook_s: float  # host time per parameter per module call under ZeRO-3 (fetch/release bookkeeping)
    calibrated: bool
    source: str


# Fitted on the seed table (bench/plan_calibrate.py --fit-seed, 2026-12-01): GEMM and flash
# efficiency, hook time and the cluster's effective per-GPU bandwidth between nodes, 4 constants on
# 7 rows.  The ring step latency is assumed, not fitted: the table cannot tell it from the hook
# time (both grow with the module count, 3 x 160 per layer in origin), and a fit with the bandwidth
# pinned at HDR's 23 GB/s put it at 5.7 us.  Eager attention (only the seed's OOM row) takes the
# GEMM efficiency.
A100 = Calibration(
    gemm_efficiency=0.110,
    flash_efficiency=0.585,
    eager_efficiency=0.110,
    ring_step_latency_s=6e-6,
    hook_s=1.1e-7,
    calibrated=True,
    source="fitted on XTuner's DeepSeek-V2 236B table, 128 x A100-80G (docs/planner.md)",
)
# Effective per-GPU bandwidth of a collective between nodes of the seed's cluster (fitted with the
# above; HDR 200 Gb/s is 25 GB/s per NIC raw: above it, the cluster has more than one NIC per GPU).
SEED_NETWORK_GBPS = 30.9
# The same fit without each row (index into SEED_TABLE): the row is predicted from the others.
# Rows 0-3 from a fit with the efficiencies unbounded, rows 5-7 bounded to (0, 1) and started from
# the full fit (bench/plan_calibrate.py fit_seed(skip=i)); printed to 3 digits.
SEED_LEAVE_ONE_OUT: dict[int, dict[str, float]] = {
    0: {"gemm_efficiency": 0.107, "flash_efficiency": 0.406, "hook_s": 1.08e-3, "network_gbps": 39.3},
    1: {"gemm_efficiency": 0.113, "flash_efficiency": 0.507, "hook_s": 4.95e-7, "network_gbps": 29.6},
    2: {"gemm_efficiency": 0.105, "flash_efficiency": 0.415, "hook_s": 1.03e-3, "network_gbps": 39.6},
    3: {"gemm_efficiency": 0.108, "flash_efficiency": 0.858, "hook_s": 3.52e-6, "network_gbps": 29.1},
    # without its one 16k no-varlen row, nothing bounds the flash efficiency but its upper limit
    5: {"gemm_efficiency": 0.113, "flash_efficiency": 1.0, "hook_s": 1.22e-6, "network_gbps": 30.4},
    6: {"gemm_efficiency": 0.131, "flash_efficiency": 0.396, "hook_s": 1.59e-4, "network_gbps": 30.2},
    7: {"gemm_efficiency": 0.0925, "flash_efficiency": 0.915, "hook_s": 1.52e-8, "network_gbps": 33.4},
}
# No table to fit on: the A100 constants, flagged.
UNCALIBRATED_GPU = dataclasses.replace(
    A100, calibrated=False, source="the A100 constants: H100/H200 constants are not calibrated"
)

# The seed's table: (max_length, moe_implementation, varlen, TGS or None for OOM).  HF rows run
# flash attention except 16k without varlen, which is HF eager.
SEED_TABLE = [
    (8192, "origin", False, 60),
    (8192, "shard", False, 120),
    (8192, "origin", True, 60),
    (8192, "shard", True, 130),
    (16384, "origin", False, None),
    (16384, "shard", False, 148),
    (16384, "origin", True, 95),
    (16384, "shard", True, 180),
]
# What the previous speed model (max(compute, comm), no hooks) predicted for those rows.
SEED_OLD_PREDICTIONS = [78, 97, 78, 97, None, 194, 157, 194]


def cpu_measurements() -> dict:
    """The CPU calibration measurements committed with the code (bench/plan_calibrate.py)."""
    return json.loads((resources.files("moe_train.plan") / "cpu_measurements.json").read_text())


def cpu_calibration() -> tuple[Calibration, dict[str, float]]:
    """The CPU (gloo, fp32, one thread per rank) constants and the device figures, from the
    committed measurements: alpha and beta fitted on the collective sweep (all-gathers and
    reduce-scatters of 1 KiB to 4 MiB on 2 ranks), the matmul rate as the peak, and the GEMM
    efficiency and hook time fitted on the P2 variants (``fitted`` in the file)."""
    m = cpu_measurements()
    world = m["world_size"]
    ring = (world - 1) / world
    xs = [r["bytes"] * ring for r in m["sweep"]]
    ys = [r["s_per_call"] for r in m["sweep"]]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    alpha = max(my - slope * mx, 0.0)
    cal = Calibration(
        gemm_efficiency=m["fitted"]["gemm_efficiency"],
        flash_efficiency=m["fitted"]["gemm_efficiency"],
        eager_efficiency=m["fitted"]["gemm_efficiency"],
        ring_step_latency_s=alpha / (world - 1),
        hook_s=m["fitted"]["hook_s"],
        calibrated=True,
        source="measured on 2 CPU ranks on gloo (moe_train/plan/cpu_measurements.json)",
    )
    # memory_gbps: the optimizer step's bandwidth, assumed (a few ms of a P2 step)
    return cal, {"peak_tflops": m["matmul_flops"] / 1e12, "link_gbps": 1 / slope / 1e9, "memory_gbps": 10.0}
