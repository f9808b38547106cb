"""The chunked linear + cross-entropy against the plain head: F.cross_entropy over full fp32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.models.common.loss import DEFAULT_BUDGET, chunk_tokens, linear_cross_entropy

T, D, V, CHUNK = 300, 32, 1000, 64  # 5 chunks, the last one partial


def case(dtype=torch.float32, ignored=slice(0, 0), seed=0):
    """Upstream activations x (hidden = a function of x, so gradients flow through the graph),
    the head weight and labels with ``ignored`` set to -100 and a few scattered ignores."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::7] = -100
    labels[ignored] = -100
    return x, w, labels


def hidden_of(x):
    return x * torch.sigmoid(x)  # any differentiable op in front of the head


def plain(x, w, labels, factor=1.0):
    logits = hidden_of(x) @ w.T
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    (loss * factor).backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


def chunked(x, w, labels, factor=1.0, chunk=CHUNK):
    loss = linear_cross_entropy(hidden_of(x), w, labels, chunk=chunk)
    (loss * factor).backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


def fresh(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def assert_exact(ours, ref):
    loss, gx, gw = ours
    ref_loss, ref_gx, ref_gw = ref
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    # fp32 sums in another order (chunk 1 sums the gradient row by row): a few ulps of the sum, 5e-6 rel
    torch.testing.assert_close(gx, ref_gx, rtol=5e-6, atol=2e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=5e-6, atol=2e-6)


@pytest.mark.parametrize("factor", [1.0, 3.7e-4])  # the trainer multiplies the sum by world * accum / tokens
def test_fp32_loss_and_every_gradient_match_the_plain_head(factor):
    x, w, labels = case()
    ref = plain(*fresh([x, w]), labels, factor)
    assert_exact(chunked(*fresh([x, w]), labels, factor), ref)
    assert ref[2].abs().sum() > 0 and ref[1].abs().sum() > 0


def test_scaled_loss_scales_every_gradient():
    x, w, labels = case()
    _, gx1, gw1 = chunked(*fresh([x, w]), labels, 1.0)
    _, gx2, gw2 = chunked(*fresh([x, w]), labels, 2.5)
    torch.testing.assert_close(gx2, gx1 * 2.5, rtol=1e-6, atol=1e-7)  # through silu: cancellation
    torch.testing.assert_close(gw2, gw1 * 2.5, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 7, T, 4 * T])
def test_any_chunk_size_gives_the_same_result(chunk):
    x, w, labels = case()
    assert_exact(chunked(*fresh([x, w]), labels, chunk=chunk), plain(*fresh([x, w]), labels))


def test_an_all_ignored_chunk_and_an_all_ignored_batch():
    x, w, labels = case(ignored=slice(64, 192))  # chunks 2 and 3 of the plain layout carry no label
    assert_exact(chunked(*fresh([x, w]), labels), plain(*fresh([x, w]), labels))
    ours = chunked(*fresh([x, w]), torch.full((T,), -100))
    assert ours[0].item() == 0.0
    assert ours[1].abs().sum() == 0 and ours[2].abs().sum() == 0
    # ignored tokens get an exactly zero hidden gradient
    _, gx, _ = chunked(*fresh([x, w]), labels)
    assert gx[64:192].abs().sum() == 0


def test_bf16_inputs_stay_close_to_the_plain_bf16_head_and_to_fp32():
    x, w, labels = case(dtype=torch.bfloat16)
    ours = chunked(*fresh([x, w]), labels, factor=1e-3)
    ref = plain(*fresh([x, w]), labels, factor=1e-3)
    exact = plain(*fresh([x.float(), w.float()]), labels, factor=1e-3)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    assert abs(ours[0].item() - ref[0].item()) <= 2e-3 * abs(ref[0].item())
    for a, b, c in zip(ours[1:], ref[1:], exact[1:]):
        scale = c.abs().max()
        assert (a.float() - b.float()).abs().max() <= 2e-2 * scale
        # at least as close to the fp32 gradients as the plain bf16 head (fp32 accumulation of dW)
        assert (a.float() - c).abs().max() <= 1.5 * (b.float() - c).abs().max() + 1e-3 * scale


def test_frozen_inputs_and_no_grad():
    x, w, labels = case()
    ref_loss = plain(*fresh([x, w]), labels)[0]
    w_frozen = w.detach()
    xr = x.detach().clone().requires_grad_()
    linear_cross_entropy(hidden_of(xr), w_frozen, labels, chunk=CHUNK).backward()
    torch.testing.assert_close(xr.grad, plain(*fresh([x, w]), labels)[1], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden_of(x), w, labels, chunk=CHUNK)
    assert not loss.requires_grad
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()


class MaxOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_builds_more_than_one_chunk_of_logits():
    x, w, labels = case()
    with MaxOutput() as m:
        chunked(*fresh([x, w]), labels)
    assert m.largest <= max(CHUNK * V, V * D)  # one chunk's logits, or the weight's own gradient
    with MaxOutput() as m:
        plain(*fresh([x, w]), labels)
    assert m.largest == T * V  # what the plain head builds (several times)


def test_chunk_size_follows_the_memory_budget():
    assert chunk_tokens(102_400, torch.float32) == DEFAULT_BUDGET // (102_400 * 4) // 8 * 8 == 1304
    assert chunk_tokens(102_400, torch.bfloat16) == 872  # fp32 logits + a bf16 copy: 6 bytes a token
    assert chunk_tokens(102_400, torch.float32, budget=100) == 1
    assert chunk_tokens(1000, torch.float32, budget=5 * 4000) == 5
    with pytest.raises(ValueError, match="budget must be positive"):
        chunk_tokens(1000, torch.float32, budget=0)


def test_bad_input_is_one_clear_error():
    x, w, labels = case()
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(x, w, labels[:-1])
    with pytest.raises(ValueError, match="ZeRO-3"):
        linear_cross_entropy(x, torch.empty(0), labels)  # a partitioned ZeRO-3 weight outside its module
    with pytest.raises(ValueError, match="positive"):
        linear_cross_entropy(x, w, labels, chunk=0)


def test_a_second_backward_is_refused():
    x, w, labels = case()
    loss = linear_cross_entropy(hidden_of(x), w, labels, chunk=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_batched_shapes_flatten():
    x, w, labels = case()
    flat = linear_cross_entropy(hidden_of(x).detach(), w.detach(), labels, chunk=CHUNK)
    batched = linear_cross_entropy(
        hidden_of(x).detach().reshape(3, 100, D), w.detach(), labels.reshape(3, 100), chunk=CHUNK
    )
    assert flat.item() == batched.item()


@pytest.mark.slow  # four fresh processes
def test_loss_memory_benchmark_smallest_size():
    """bench/loss_memory.py at its test size: real processes, real RSS; the chunked head must win."""
    from bench import loss_memory

    result = loss_memory.run("test")
    assert result.figures["loss_rel_diff"] <= 1e-6
    assert result.figures["loss_activation_ratio"] <= 0.15  # 8 chunks: about 1/32 of plain's four (T, V) buffers
    assert "| chunked | 256 |" in result.table
