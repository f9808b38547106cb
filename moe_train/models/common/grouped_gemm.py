"""Grouped GEMMs of the routed experts, with the layout ``F.grouped_mm`` demands.

Shapes: A rows sorted by group (token-expert assignments), S groups (experts of a shard), I in
features, O out features; ``counts_S`` rows per group (zeros allowed).

``F.grouped_mm`` on CUDA takes bf16 operands whose data pointers are 16-byte aligned and whose
leading strides are multiples of 16 bytes (8 bf16 elements); per-group row counts need no
alignment for bf16 (FP8 would).  Debug sizes and views such as ``gate_up[..., F:]`` break that, and
today the model then silently takes a Python loop.  ``grouped_mm`` and ``grouped_weight_grad``
here copy the operands into zero-padded contiguous buffers whose feature dimensions are rounded
up to the alignment, call the kernel, and slice the padding off: padded rows and columns only add
exact zeros to the sums, so the numerics are those of the unpadded product.  ``*_loop`` are the
reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ALIGN_BYTES = 16


def is_aligned(t: torch.Tensor) -> bool:
    """16-byte aligned data pointer and every non-unit stride a multiple of 16 bytes."""
    return t.data_ptr() % ALIGN_BYTES == 0 and all(
        s == 1 or s * t.element_size() % ALIGN_BYTES == 0 for s in t.stride()
    )


def padded_size(n: int, dtype: torch.dtype) -> int:
    """`n` rounded up to a whole number of 16-byte blocks of `dtype` elements."""
    per = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-n // per) * per


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """A fresh contiguous (16-byte aligned) copy of `t` with its last dimension zero-padded to `size`."""
    out = t.new_zeros(*t.shape[:-1], size)
    out[..., : t.shape[-1]] = t
    return out


def _offsets(counts_S: torch.Tensor) -> torch.Tensor:
    return counts_S.cumsum(0).to(torch.int32)


def grouped_mm(x_AI: torch.Tensor, w_SIO: torch.Tensor, counts_S: torch.Tensor,
               kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """out[rows of s] = x[rows of s] @ w[s], (A, O), through `kernel` (default ``F.grouped_mm``).

    Operands the kernel cannot take as they are get padded (I and O to the alignment) first.
    """
    kernel = kernel or F.grouped_mm
    if is_aligned(x_AI) and is_aligned(w_SIO):
        return kernel(x_AI, w_SIO, offs=_offsets(counts_S))
    I = x_AI.shape[1]
    S, _, O = w_SIO.shape
    Ip, Op = padded_size(I, x_AI.dtype), padded_size(O, x_AI.dtype)
    x = _pad_last(x_AI, Ip)  # (A, Ip): zero columns
    w = w_SIO.new_zeros(S, Ip, Op)  # zero rows meet the zero columns of x; zero columns are sliced off
    w[:, :I, :O] = w_SIO
    return kernel(x, w, offs=_offsets(counts_S))[:, :O]


def grouped_weight_grad(grad_AO: torch.Tensor, x_AI: torch.Tensor, counts_S: torch.Tensor,
                        kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """(S, O, I) with [s] = grad[rows of s].T @ x[rows of s]: the weight gradient (groups along A)."""
    kernel = kernel or F.grouped_mm
    gT = grad_AO.t()
    if is_aligned(gT) and is_aligned(x_AI):
        return kernel(gT, x_AI, offs=_offsets(counts_S))
    O, I = grad_AO.shape[1], x_AI.shape[1]
    g = _pad_last(grad_AO, padded_size(O, grad_AO.dtype))  # zero gradient columns: zero output rows
    x = _pad_last(x_AI, padded_size(I, x_AI.dtype))  # zero input columns: zero output columns
    return kernel(g.t(), x, offs=_offsets(counts_S))[:, :O, :I]


def grouped_mm_loop(x_AI: torch.Tensor, w_SIO: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The reference: one ``torch.mm`` per group (``offs`` as ``F.grouped_mm`` takes it)."""
    if x_AI.dim() == 2 and w_SIO.dim() == 3:  # forward: rows grouped
        out = x_AI.new_zeros(x_AI.shape[0], w_SIO.shape[2])
        start = 0
        for s, end in enumerate(offs.tolist()):
            out[start:end] = x_AI[start:end] @ w_SIO[s]
            start = end
        return out
    # weight gradient: (O, A) x (A, I), the contraction dimension grouped
    out = x_AI.new_zeros(len(offs), x_AI.shape[0], w_SIO.shape[1])
    start = 0
    for s, end in enumerate(offs.tolist()):
        out[s] = x_AI[:, start:end] @ w_SIO[start:end]
        start = end
    return out
