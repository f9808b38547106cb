"""Causal attention over packed variable-length samples, as a module a family's attention calls.

Shapes: B batch, T tokens, H heads, D q/k head dim, V value head dim (may be < D, as in MLA).
``cu_seqlens`` (int32, n+1) holds the sample boundaries of a packed row (B == 1): tokens attend
causally inside their own sample only.  ``VarlenAttention`` is the ``inner_attention`` submodule
of every family's attention, so sequence parallelism or a kernel swap wraps or replaces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # flash-attn is an optional GPU dependency (extra "gpu").
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None


def torch_varlen_as_flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash-attn's ``flash_attn_varlen_func`` signature on torch's own varlen kernel (CUDA only)."""
    from torch.nn.attention.varlen import varlen_attn

    window = (-1, 0) if causal else (-1, -1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window_size=window)


def _torch_has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_kernel():
    """The flash-style varlen kernel of this install: flash-attn's, else torch's own (CUDA), else None."""
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func
    return torch_varlen_as_flash if _torch_has_varlen() else None


ATTENTION_BACKENDS = ("auto", "flash", "sdpa")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; use one of {list(ATTENTION_BACKENDS)}")
    if backend == "flash" and varlen_kernel() is None:
        raise ValueError(
            "attention backend 'flash' needs flash-attn or torch.nn.attention.varlen; install the 'gpu' "
            "extra or use 'sdpa'"
        )
    if backend == "auto":
        return "flash" if varlen_kernel() is not None and device.type == "cuda" else "sdpa"
    return backend


def attention_kernel(backend: str, device: torch.device) -> tuple[str, str]:
    """(kernel, why) that ``varlen_attention`` runs for ``backend`` on ``device``."""
    if resolve_backend(backend, device) == "flash":
        if flash_attn_varlen_func is not None:
            return "flash-varlen", "flash_attn.flash_attn_varlen_func (v padded to the q/k head dim)"
        return "torch-varlen", "torch.nn.attention.varlen.varlen_attn (flash-attn not installed)"
    if device.type == "cuda":
        return "sdpa-per-sample", (
            "neither flash-attn (extra 'gpu') nor torch.nn.attention.varlen: one SDPA call per packed sample"
        )
    return "sdpa-per-sample", "exact per-sample SDPA on CPU"


def varlen_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHV: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Causal attention restricted to each packed sample; returns (B, T, H, V)."""
    B, T, H, D = q_BTHD.shape
    V = v_BTHV.shape[-1]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q_BTHD.device)
        max_seqlen = T
    elif B != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but the batch has {B} rows; pack into shape (1, T)")
    # Both kernels want equal q/k/v head dims (MLA has V < D): pad v, drop the padding after.
    v_pad = F.pad(v_BTHV, (0, D - V)) if V < D else v_BTHV
    if resolve_backend(backend, q_BTHD.device) == "flash":
        out = varlen_kernel()(
            q_BTHD.reshape(B * T, H, D),
            k_BTHD.reshape(B * T, H, D),
            v_pad.reshape(B * T, H, D),
            cu_seqlens,
            cu_seqlens,
            max_seqlen or T,
            max_seqlen or T,
            softmax_scale=scale,
            causal=True,
        )
        return out[..., :V].reshape(B, T, H, V)
    # Exact fallback: causal SDPA on each sample (no T x T mask across samples is ever built);
    # 4-D inputs with equal head dims let SDPA pick its flash kernel on CPU instead of the math path.
    q, k, v = (t.reshape(B * T, H, D).transpose(0, 1)[None] for t in (q_BTHD, k_BTHD, v_pad))  # (1, H, B*T, D)
    bounds = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=2)[0, ..., :V].transpose(0, 1).reshape(B, T, H, V)


class VarlenAttention(nn.Module):
    """``inner_attention``: (q, k, v, cu_seqlens, max_seqlen) -> (B, T, H, V) with a fixed softmax scale."""

    def __init__(self, softmax_scale: float, backend: str = "auto") -> None:
        super().__init__()
        self.softmax_scale, self.backend = softmax_scale, backend

    def forward(
        self,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHV: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> torch.Tensor:
        return varlen_attention(q_BTHD, k_BTHD, v_BTHV, cu_seqlens, max_seqlen, self.softmax_scale, self.backend)
