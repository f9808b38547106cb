"""What runs: the attention and expert kernels, dtype, device and versions, said once at start-up.

On CUDA a fallback to a slow path (per-sample SDPA instead of flash-attn's varlen kernel, a Python loop
over experts instead of ``grouped_mm``) is a warning naming the fix, or an error when the recipe's
``require_fast_kernels`` is on (the shipped GPU recipes).  On CPU the exact fallbacks are the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from moe_train.models.common.attention import attention_kernel
from moe_train.models.common.experts import ExpertLayout, expert_kernel


@dataclass(frozen=True)
class Kernels:
    attention: tuple[str, str]  # (kernel, why)
    experts: tuple[str, str]
    dtype: torch.dtype
    device: torch.device

    @property
    def slow(self) -> list[str]:
        """The slow fallbacks taken on a GPU, each with its reason (empty on CPU)."""
        if self.device.type != "cuda":
            return []
        out = []
        if self.attention[0] not in ("flash-varlen", "torch-varlen"):
            out.append(f"attention {self.attention[0]} ({self.attention[1]})")
        if self.experts[0] == "loop":
            out.append(f"experts loop ({self.experts[1]})")
        return out

    def line(self) -> str:
        versions = ", ".join(
            f"{name} {_version(name)}" for name in ("torch", "deepspeed", "transformers", "flash-attn")
        )
        return (
            f"kernels: attention {self.attention[0]} ({self.attention[1]}); experts {self.experts[0]} "
            f"({self.experts[1]}); {str(self.dtype).removeprefix('torch.')} on {self.device}; {versions}"
        )


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def kernels(
    cfg: Any, layout: ExpertLayout, dtype: torch.dtype, device: torch.device, attn_backend: str = "auto"
) -> Kernels:
    if layout.moe_implementation == "shard":
        experts = expert_kernel(device.type, dtype, cfg.hidden_size, cfg.expert_intermediate_size)
    else:
        experts = ("per-expert modules", "moe_implementation=origin, the baseline")
    return Kernels(attention_kernel(attn_backend, device), experts, dtype, device)


def check(k: Kernels, require_fast: bool) -> str | None:
    """An error for slow kernels on a GPU when required; else the warning to log (or None)."""
    if not k.slow:
        return None
    msg = "; ".join(k.slow)
    if require_fast:
        raise ValueError(f"slow kernels on {k.device}: {msg}; fix that, or pass --allow-slow-kernels")
    return f"warning: slow kernels on {k.device}: {msg}"
