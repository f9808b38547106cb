"""Causal-LM cross entropy: position t is scored against labels[t+1] (HF convention); -100 is ignored.

Fused linear + cross-entropy over token chunks: the LM head's loss without (T, V) logits.

Shapes: T tokens, D hidden, V vocabulary, C tokens of one chunk.

``linear_cross_entropy(hidden_TD, weight_VD, labels_T)`` is the cross-entropy *sum* of
``hidden_TD @ weight_VD.T`` against ``labels_T`` (already shifted; -100 ignored), as
``F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")`` computes it, but
one chunk of C tokens at a time: the chunk's logits, their fp32 log-softmax, the loss and the
chunk's gradients with respect to the hidden states and the head's weight are all computed in the
forward, and the (C, V) buffer is freed before the next chunk.  Backward only scales the stored
gradients by the incoming gradient, so nothing is recomputed and the (T, V) logits never exist.

- Tokens whose label is -100 are dropped before any GEMM (one host sync per call): in SFT data
  the prompt tokens cost no logits at all.
- Under bf16 the GEMMs take bf16 operands (fp32 accumulation inside the GEMM, as the plain head
  does), the log-softmax and the loss are fp32, and the weight's gradient is accumulated over
  chunks in fp32, in blocks of vocabulary rows so the bf16 product of one chunk never needs a
  full (V, D) temporary.
- C comes from a memory budget (``chunk_tokens``): the bytes one chunk's logits take in the loop.
- Memory it keeps from forward to backward: the gradients themselves, (T, D) in the hidden
  states' dtype and (V, D) in fp32 (scaled in fp32, then returned in the weight's dtype).
- Backward runs once (``retain_graph`` double backward is refused) and the function is not
  meant to sit inside activation checkpointing: a recomputed forward would redo all the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[..., t+1] at position t, IGNORE_INDEX at the end: the target of every position."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross entropy in fp32 of logits (..., V) against already shifted ``targets`` (...)."""
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of position t against labels[t+1]; ``reduction`` "mean" over scored tokens or "sum"."""
    return cross_entropy(logits, shift_labels(labels), reduction)


class LMHead(nn.Linear):
    """The LM head (weight (V, D), HF key ``lm_head.weight``): logits, or with ``targets`` (shifted labels)
    the cross-entropy sum computed by ``linear_cross_entropy`` without (T, V) logits.  A module, so that
    under ZeRO-3 its weight is gathered around this forward."""

    def __init__(self, hidden_size: int, vocab_size: int, std: float) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)
        nn.init.normal_(self.weight, std=std)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets)


# ---------------------------------------------------------------------------- fused linear + CE
DEFAULT_BUDGET = 512 * 2**20  # bytes of one chunk's logits in the loop


def chunk_tokens(vocab: int, dtype: torch.dtype, budget: int = DEFAULT_BUDGET) -> int:
    """Tokens per chunk so one chunk's logits buffers fit in ``budget`` bytes.

    Per token the loop holds its fp32 logits (then probabilities, in place) plus, for a narrower
    dtype, the logits as the GEMM wrote them or the gradient cast back for the next GEMMs.
    Rounded down to a multiple of 8 (tensor-core friendly); at least 1.
    """
    if budget <= 0:
        raise ValueError(f"loss memory budget must be positive, got {budget}; pass e.g. {DEFAULT_BUDGET}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = vocab * (4 + (itemsize if itemsize != 4 else 0))
    rows = budget // per_token
    return max(1, rows // 8 * 8 if rows >= 8 else rows)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int | None = None,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """Cross-entropy sum (fp32 scalar) of ``hidden @ weight.T`` against ``labels`` (-100 ignored).

    ``hidden`` is (..., D) and ``labels`` the matching (...) shape, already shifted (label of
    token t is what t predicts).  ``chunk`` fixes the tokens per chunk; by default it follows
    ``budget`` (see ``chunk_tokens``).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree; "
            "labels must have hidden's shape without its last dimension"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} is not (vocab, {hidden.shape[-1]}); pass the LM head's weight "
            "(under ZeRO-3, from inside the head module's forward, where it is gathered)"
        )
    if chunk is None:
        chunk = chunk_tokens(weight.shape[0], hidden.dtype, budget)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk)


def _chunk_loss_and_grad(
    h_CD: torch.Tensor, weight_VD: torch.Tensor, y_C: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sum of one chunk of valid tokens, and d(loss)/d(logits) in the GEMMs' dtype."""
    logits_CV = (h_CD @ weight_VD.T).float()  # no copy when already fp32
    target_C = logits_CV.gather(1, y_C[:, None]).squeeze(1)
    max_C1 = logits_CV.amax(dim=-1, keepdim=True)
    exp_CV = logits_CV.sub_(max_C1).exp_()  # in place: the chunk's only (C, V) fp32 buffer
    sum_C = exp_CV.sum(dim=-1)
    loss = (max_C1.squeeze(1) + sum_C.log() - target_C).sum()
    if not with_grad:
        return loss, None
    probs_CV = exp_CV.div_(sum_C[:, None])  # softmax, in place
    probs_CV.scatter_add_(1, y_C[:, None], probs_CV.new_full((len(y_C), 1), -1.0))
    return loss, probs_CV.to(h_CD.dtype)


def _weight_grad_add_(grad_VD: torch.Tensor, g_CV: torch.Tensor, h_CD: torch.Tensor, block_rows: int) -> None:
    """grad_VD (fp32) += g_CV.T @ h_CD: directly in fp32, else in vocabulary blocks of ``block_rows``."""
    if g_CV.dtype == grad_VD.dtype:
        grad_VD.addmm_(g_CV.T, h_CD)
        return
    for v in range(0, grad_VD.shape[0], block_rows):
        grad_VD[v : v + block_rows] += g_CV[:, v : v + block_rows].T @ h_CD


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, labels_T, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with_grad = want_h or want_w
        V, D = weight_VD.shape
        valid_idx = (labels_T != IGNORE_INDEX).nonzero().squeeze(1)  # the call's one host sync
        loss = torch.zeros((), dtype=torch.float32, device=hidden_TD.device)
        grad_h_TD = torch.zeros_like(hidden_TD) if want_h else None
        grad_w_VD = torch.zeros(V, D, dtype=torch.float32, device=weight_VD.device) if want_w else None
        # vocabulary rows per block of the bf16 weight-gradient product: no more than the chunk's logits
        block_rows = max(1, (chunk * V) // max(D, 1))
        for s in range(0, len(valid_idx), chunk):
            idx_C = valid_idx[s : s + chunk]
            h_CD = hidden_TD[idx_C]
            chunk_loss, g_CV = _chunk_loss_and_grad(h_CD, weight_VD, labels_T[idx_C], with_grad)
            loss += chunk_loss
            if want_h:
                grad_h_TD[idx_C] = g_CV @ weight_VD
            if want_w:
                _weight_grad_add_(grad_w_VD, g_CV, h_CD, block_rows)
            del g_CV
        ctx.grads, ctx.weight_dtype = (grad_h_TD, grad_w_VD), weight_VD.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice through one forward; "
                "call the loss again instead of retain_graph=True"
            )
        grad_h_TD, grad_w_VD = ctx.grads
        ctx.grads = None  # freed as soon as autograd takes them
        # The trainer scales the loss by a factor: scaled in fp32 (a bf16 copy of the factor would be
        # off by up to 0.4%), in place where the buffer is fp32 (it is this call's own).
        scale = grad_loss.float()
        if grad_h_TD is not None:
            grad_h_TD = (
                grad_h_TD.mul_(scale)
                if grad_h_TD.dtype == torch.float32
                else (grad_h_TD.float() * scale).to(grad_h_TD.dtype)
            )
        if grad_w_VD is not None:
            grad_w_VD = grad_w_VD.mul_(scale).to(ctx.weight_dtype)
        return grad_h_TD, grad_w_VD, None, None
