"""Varlen attention (``models/common/attention.py``) with fewer k/v heads than q heads (GQA), on the CPU
fallback: against a float64 softmax written out by hand, and bit-exact against the same heads repeated."""

from __future__ import annotations

import pytest
import torch

from moe_train.models.common.attention import VarlenAttention, varlen_attention


def reference(q, k, v, cu, scale):
    """softmax(q k^T * scale + causal mask inside each sample) v in float64; q head h reads k/v head h // (H/G)."""
    H, G = q.shape[2], k.shape[2]
    q, k, v = (t[0].double() for t in (q, k, v))  # (T, heads, dim)
    out = torch.zeros(q.shape[0], H, v.shape[-1], dtype=torch.float64)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        for h in range(H):
            g = h // (H // G)
            scores = q[s:e, h] @ k[s:e, g].T * scale
            scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
            out[s:e, h] = scores.softmax(dim=-1) @ v[s:e, g]
    return out[None]


@pytest.mark.parametrize("H,G", [(8, 2), (6, 3), (4, 1)])
def test_gqa_matches_the_formula_and_repeated_heads_exactly(H, G):
    torch.manual_seed(0)
    T, D, V = 11, 16, 12  # V < D, as MLA: v is padded inside and the padding dropped
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)  # a one-token sample in the middle
    q = torch.randn(1, T, H, D, requires_grad=True)
    k = torch.randn(1, T, G, D, requires_grad=True)
    v = torch.randn(1, T, G, V, requires_grad=True)
    out = VarlenAttention(0.3, "sdpa")(q, k, v, cu, 7)
    assert out.shape == (1, T, H, V)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, 0.3), rtol=0, atol=1e-6)
    # The same attention with every k/v head repeated for its q heads (plain multi-head): identical bits.
    k_rep, v_rep = (t.detach().repeat_interleave(H // G, dim=2).requires_grad_() for t in (k, v))
    dense = varlen_attention(q, k_rep, v_rep, cu, 7, 0.3, "sdpa")
    assert torch.equal(out, dense)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    dq_rep, dk_rep, dv_rep = torch.autograd.grad(dense, (q, k_rep, v_rep), g)
    assert torch.equal(dq, dq_rep)
    # Each k/v head's gradient is the sum over the q heads that read it.
    torch.testing.assert_close(dk, dk_rep.unflatten(2, (G, H // G)).sum(dim=3), rtol=0, atol=1e-6)
    torch.testing.assert_close(dv, dv_rep.unflatten(2, (G, H // G)).sum(dim=3), rtol=0, atol=1e-6)


def test_kv_heads_must_divide_q_heads():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="dividing the 6 q heads"):
        varlen_attention(q, k, k, None, None, 0.3, "sdpa")
