"""The alignment padding around F.grouped_mm, exact against one torch.mm per group.

Inputs are small integers in fp32, so every product and partial sum is exact: any summation order
(the kernel's, the loop's, with or without padded zeros) gives bit-identical results, and
``torch.equal`` tests the padding logic itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_train.models.common.grouped_gemm import (
    grouped_mm,
    grouped_mm_loop,
    grouped_weight_grad,
    is_aligned,
    padded_size,
)

COUNTS = [0, 3, 17, 1, 0, 9]  # empty groups, odd counts


def ints(*shape, seed):
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


def reference(x, w, counts):
    out, start = [], 0
    for s, n in enumerate(counts):
        out.append(x[start : start + n] @ w[s])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("kernel", [grouped_mm_loop, F.grouped_mm], ids=["loop", "F.grouped_mm"])
@pytest.mark.parametrize("I,O", [(30, 45), (32, 48), (7, 5)])  # misaligned, aligned, tiny
def test_forward_is_exact_aligned_or_not(kernel, I, O):
    counts = torch.tensor(COUNTS)
    x, w = ints(sum(COUNTS), I, seed=0), ints(len(COUNTS), I, O, seed=1)
    out = grouped_mm(x, w, counts, kernel=kernel)
    assert out.shape == (sum(COUNTS), O)
    assert torch.equal(out, reference(x, w, COUNTS))


@pytest.mark.parametrize("kernel", [grouped_mm_loop, F.grouped_mm], ids=["loop", "F.grouped_mm"])
@pytest.mark.parametrize("I,O", [(30, 45), (32, 48), (7, 5)])
def test_weight_grad_is_exact_aligned_or_not(kernel, I, O):
    counts = torch.tensor(COUNTS)
    g, x = ints(sum(COUNTS), O, seed=2), ints(sum(COUNTS), I, seed=3)
    out = grouped_weight_grad(g, x, counts, kernel=kernel)
    ref, start = torch.zeros(len(COUNTS), O, I), 0
    for s, n in enumerate(COUNTS):
        ref[s] = g[start : start + n].T @ x[start : start + n]
        start += n
    assert out.shape == (len(COUNTS), O, I)
    assert torch.equal(out, ref)
    assert out[0].abs().sum() == 0 and out[4].abs().sum() == 0  # empty groups: zero gradient


def test_misaligned_views_are_padded_before_the_kernel():
    """What the kernel receives is aligned even for a view at an odd offset (gate_up[..., F:])."""
    seen = []

    def recording_kernel(a, b, offs):
        seen.append((is_aligned(a), is_aligned(b)))
        return grouped_mm_loop(a, b, offs)

    counts = torch.tensor(COUNTS)
    w_full = ints(len(COUNTS), 32, 2 * 45, seed=4)
    w = w_full[..., 45:]  # a view: stride 90, offset 45 floats
    x = ints(sum(COUNTS), 32, seed=5)
    assert not is_aligned(w)
    out = grouped_mm(x, w, counts, kernel=recording_kernel)
    assert seen == [(True, True)]
    assert torch.equal(out, reference(x, w, COUNTS))


def test_padded_size_counts_16_byte_blocks():
    assert padded_size(30, torch.float32) == 32 and padded_size(32, torch.float32) == 32
    assert padded_size(30, torch.bfloat16) == 32 and padded_size(1, torch.bfloat16) == 8
    assert padded_size(1408, torch.bfloat16) == 1408  # DeepSeek-V2-Lite's expert width is aligned
