"""Causal attention over packed variable-length samples, as a module a family's attention calls.

Shapes: B batch, T tokens, H query heads, G key/value heads (G divides H: grouped-query attention;
G == H for MLA and plain multi-head attention), D q/k head dim, V value head dim (may be < D, as in MLA).
``cu_seqlens`` (int32, n+1) holds the sample boundaries of a packed row (B == 1): tokens attend
causally inside their own sample only.  ``VarlenAttention`` is the ``inner_attention`` submodule
of every family's attention, so sequence parallelism or a kernel swap wraps or replaces it.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

try:  # flash-attn is an optional GPU dependency (extra "gpu").
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None


def torch_varlen_as_flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash-attn's ``flash_attn_varlen_func`` signature on torch's own varlen kernel (CUDA only); fewer
    k/v heads than q heads is grouped-query attention, as flash-attn reads it."""
    from torch.nn.attention.varlen import varlen_attn

    window = (-1, 0) if causal else (-1, -1)
    gqa = k.shape[1] != q.shape[1]
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window_size=window, enable_gqa=gqa)


def _torch_has_varlen() -> bool:
    # Looked up, not imported: importing it loads torch's compiler stack (about 2.5 s of CPU per rank).
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


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
        return "flash" if device.type == "cuda" and varlen_kernel() is not None else "sdpa"
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
    k_BTGD: torch.Tensor,
    v_BTGV: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Causal attention restricted to each packed sample; returns (B, T, H, V).  Query head h attends
    with k/v head h // (H / G) (grouped-query attention when G < H)."""
    B, T, H, D = q_BTHD.shape
    G, V = k_BTGD.shape[2], v_BTGV.shape[-1]
    if H % G or v_BTGV.shape[2] != G:
        raise ValueError(
            f"attention needs k and v with the same head count dividing the {H} q heads; got "
            f"{G} k heads and {v_BTGV.shape[2]} v heads"
        )
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q_BTHD.device)
        max_seqlen = T
    elif B != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but the batch has {B} rows; pack into shape (1, T)")
    # Both kernels want equal q/k/v head dims (MLA has V < D): pad v, drop the padding after.
    v_pad = F.pad(v_BTGV, (0, D - V)) if V < D else v_BTGV
    if resolve_backend(backend, q_BTHD.device) == "flash":  # both varlen kernels take G < H k/v heads as they are
        out = varlen_kernel()(
            q_BTHD.reshape(B * T, H, D),
            k_BTGD.reshape(B * T, G, D),
            v_pad.reshape(B * T, G, D),
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
    # GQA: each k/v head repeated for its H / G q heads (a copy, exact; SDPA's enable_gqa takes the math path).
    k_BTHD, v_BTHD = (t.repeat_interleave(H // G, dim=2) if G < H else t for t in (k_BTGD, v_pad))
    q, k, v = (t.reshape(B * T, H, D).transpose(0, 1)[None] for t in (q_BTHD, k_BTHD, v_BTHD))  # (1, H, B*T, D)
    bounds = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=2)[0, ..., :V].transpose(0, 1).reshape(B, T, H, V)


class VarlenAttention(nn.Module):
    """``inner_attention``: (q (B, T, H, D), k (B, T, G, D), v (B, T, G, V), cu_seqlens, max_seqlen) ->
    (B, T, H, V) with a fixed softmax scale."""

    def __init__(self, softmax_scale: float, backend: str = "auto") -> None:
        super().__init__()
        self.softmax_scale, self.backend = softmax_scale, backend

    def forward(
        self,
        q_BTHD: torch.Tensor,
        k_BTGD: torch.Tensor,
        v_BTGV: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> torch.Tensor:
        return varlen_attention(q_BTHD, k_BTGD, v_BTGV, cu_seqlens, max_seqlen, self.softmax_scale, self.backend)
