"""Throughput (TGS), model FLOPs utilisation (MFU), expert load and memory for each step.

FLOPs of one training step (forward + backward = 3 x forward):
    6 * N_active * tokens                                    (every matmul weight a token touches)
  + 6 * layers * heads * (qk_head_dim + v_head_dim) * sum_i s_i^2 / 2   (causal attention scores and
                                                              values over each packed sample i of s_i tokens)
N_active counts attention, dense MLP, shared experts, the top-k routed experts, the router and the
LM head; the embedding lookup is not a matmul and is left out.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import torch

from moe_train.models.deepseek_v2.config import DeepseekV2Config

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0}


def active_matmul_params(cfg: DeepseekV2Config) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = D * H * cfg.qk_head_dim
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + H * cfg.v_head_dim * D
    total = 0
    for layer in range(cfg.num_hidden_layers):
        total += attn
        if cfg.is_moe_layer(layer):
            experts = cfg.num_experts_per_tok + (cfg.n_shared_experts or 0)
            total += 3 * D * cfg.moe_intermediate_size * experts + D * cfg.n_routed_experts
        else:
            total += 3 * D * cfg.intermediate_size
    return total + D * cfg.vocab_size


def step_flops(cfg: DeepseekV2Config, sample_lengths: list[int]) -> float:
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
