"""Throughput (TGS), model FLOPs utilisation (MFU), expert load and memory for each step.

FLOPs of one training step (forward + backward = 3 x forward):
    6 * N_active * tokens                                    (every matmul weight a token touches)
  + 6 * layers * heads * (qk_head_dim + v_head_dim) * sum_i s_i^2 / 2   (causal attention scores and
                                                              values over each packed sample i of s_i tokens)
N_active counts attention, dense MLP, shared experts, the top-k routed experts, the router and the
LM head, on the model built on the meta device (``moe_train.models.param_counts``); the embedding
lookup and the norms are not matmuls and are left out.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import torch

from moe_train.models import param_counts

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0}


def active_matmul_params(cfg: Any) -> int:
    return param_counts(cfg).active_matmul


def step_flops(cfg: Any, sample_lengths: list[int]) -> float:
    tokens = sum(sample_lengths)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * sum(
        s * s / 2 for s in sample_lengths)
    return 6 * active_matmul_params(cfg) * tokens + attn


def peak_tflops(override: float | None) -> float | None:
    """Peak dense TFLOP/s of this device: the override, the table, or None (unknown, e.g. CPU)."""
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def expert_load_stats(load_LE: torch.Tensor) -> list[dict[str, float]]:
    """Per MoE layer: min, max and coefficient of variation of tokens per expert."""
    load = load_LE.float()
    mean = load.mean(dim=1).clamp(min=1e-9)
    cv = load.std(dim=1, unbiased=False) / mean
    return [{"min": int(a), "max": int(b), "cv": round(float(c), 4)}
            for a, b, c in zip(load.min(dim=1).values, load.max(dim=1).values, cv)]


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsWriter:
    """One JSON object per step in ``{work_dir}/metrics.jsonl``, and TensorBoard when installed."""

    def __init__(self, fs: Any, path: str, tb_dir: str | None) -> None:
        self._f = fs.open(path, "a")
        self._tb = None
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(tb_dir)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
