"""Rotary embedding with YaRN scaling as DeepSeek defines it (interleaved pairs, mscale on cos/sin): the
DeepSeek V2 and V3 families (and Kimi K2, Moonlight) use it for MLA's rope part."""

from __future__ import annotations

import math
from typing import Any

import torch


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _inv_freq(dim: int, base: float, rs: dict[str, Any] | None, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the scale applied to cos/sin."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    extrapolated = 1.0 / base**exponents
    if not rs:
        return extrapolated, 1.0
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; DeepSeek uses 'yarn'")
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings") or 4096  # DeepSeek's code defaults to 4096
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    # ramp=0: high-frequency dims keep their frequency; ramp=1: low-frequency dims are interpolated.
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    # DeepSeek's definition: with mscale == mscale_all_dim (both V2 sizes) the ratio is 1.
    mscale = yarn_get_mscale(factor, rs.get("mscale", 1)) / yarn_get_mscale(factor, rs.get("mscale_all_dim", 0))
    return inv_freq, mscale


def rope_cos_sin(
    position_ids: torch.Tensor, dim: int, base: float, rope_scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape position_ids.shape + (dim/2,), fp32, mscale applied (``rope_scaling``: None
    or a yarn dict as config.json has it)."""
    inv_freq, mscale = _inv_freq(dim, base, rope_scaling, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos() * mscale, angles.sin() * mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim.

    x is (B, T, heads, rope_dim), cos/sin (B, T, rope_dim/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
