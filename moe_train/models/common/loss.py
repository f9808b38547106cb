"""Causal-LM cross entropy: position t is scored against labels[t+1] (HF convention); -100 is ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[..., t+1] at position t, IGNORE_INDEX at the end: the target of every position."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross entropy in fp32 of logits (..., V) against already shifted ``targets`` (...)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of position t against labels[t+1]; ``reduction`` "mean" over scored tokens or "sum"."""
    return cross_entropy(logits, shift_labels(labels), reduction)
