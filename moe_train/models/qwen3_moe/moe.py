"""Qwen3's MoE block: a softmax top-k router (``norm_topk_prob``), routed experts in the ``shard`` or
``origin`` layout (``models/common/experts.py``), no shared experts; and its load-balancing loss.

Shapes: B batch, T tokens, D hidden, E routed experts, K experts per token, L MoE layers.

The balance loss is transformers 5's ``load_balancing_loss_func`` (Switch Transformer's): over every MoE
layer's routing at once, ``E * sum_e (hits_e / N) * (P_e / N)`` where hits_e counts the assignments to
expert e and P_e sums the router probabilities of e over all layers' real tokens, and N is the layers
times the tokens.  It couples the layers (the sums run over them before the product), so each block
returns its statistics and the model combines them (``balance_loss``).  The loss is over the whole
batch, not per sample: a packed row gives exactly the loss of its samples as an unpacked, padded batch
with an attention mask (transformers' ``attention_mask`` leaves the padding out the same way).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.models.common.experts import ExpertLayout, dispatch_and_combine, routed_experts

# Our parameter names inside a decoder layer, equal to the HF keys; the ``shard`` layout's stacked
# experts map to the same per-expert keys as DeepSeek's (``models/common/moe.py``: STACKED_EXPERT_KEYS).
QWEN3_MOE_KEYS = [
    "mlp.gate.weight",  # the router
    "mlp.experts.{}.gate_proj.weight",  # `origin`: one module per expert
    "mlp.experts.{}.up_proj.weight",
    "mlp.experts.{}.down_proj.weight",
]


class Router(nn.Module):
    """Softmax over the E experts in fp32, top-k, renormalised to sum 1 when ``norm_topk_prob``.  The logits
    are fp32 too (transformers takes them in the model dtype: equal in fp32, less rounding under bf16)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.initializer_range)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns probabilities (T, E) fp32, top-k weights (T, K) fp32 and expert indices (T, K)."""
        probs_TE = F.linear(x_TD.float(), self.weight.float()).softmax(dim=-1)
        weight_TK, index_TK = probs_TE.topk(self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return probs_TE, weight_TK, index_TK


class RoutingStats(NamedTuple):
    """One layer's share of the balance loss: ``hits_E`` (assignments per expert) and ``tokens`` are the
    whole rows' (summed over the balance group; no gradient), ``probs_E`` this rank's tokens' router
    probabilities summed (the gradient path); ``group_size`` the ranks sharing the rows."""

    hits_E: torch.Tensor
    probs_E: torch.Tensor
    tokens: torch.Tensor
    group_size: int


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, layout: ExpertLayout) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = routed_experts(
            layout, cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.initializer_range
        )
        # Sequence parallelism sets the group whose ranks share each row, for the balance loss.
        self.balance_group: dist.ProcessGroup | None = None

    def forward(
        self, x_BTD: torch.Tensor, segment_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingStats | None, torch.Tensor]:
        """``segment_T``: each token's sequence (-1: padding, left out of the statistics).  Returns output
        (B, T, D), the routing statistics (training only) and tokens per expert (E,) over the real tokens."""
        B, T, D = x_BTD.shape
        E = self.cfg.num_experts
        x_TD = x_BTD.reshape(-1, D)
        probs_TE, weight_TK, index_TK = self.gate(x_TD)
        out_TD, _ = dispatch_and_combine(self.experts, x_TD, weight_TK, index_TK, E)
        real = segment_T >= 0 if segment_T is not None else torch.ones(B * T, dtype=torch.bool, device=x_TD.device)
        load_E = torch.bincount(index_TK[real].reshape(-1), minlength=E)
        stats = None
        if self.training and self.cfg.router_aux_loss_coef > 0:
            counts = torch.cat([load_E.float(), real.sum().float()[None]])  # hits per expert, then tokens
            size = 1
            if self.balance_group is not None:
                dist.all_reduce(counts, group=self.balance_group)
                size = dist.get_world_size(self.balance_group)
            stats = RoutingStats(counts[:E], probs_TE[real].sum(dim=0), counts[E], size)
        return out_TD.view_as(x_BTD), stats, load_E


def balance_loss(per_layer: list[RoutingStats], num_experts: int, coef: float) -> torch.Tensor | None:
    """``coef`` x transformers 5's load-balancing loss over the MoE layers' statistics.  Under sequence
    parallelism each rank's probabilities are its slice's, so its share is multiplied by the group size:
    the gradient average over the world divides by it (as ``models/common/experts.balance_loss``)."""
    if not per_layer:
        return None
    hits_E = torch.stack([s.hits_E for s in per_layer]).sum(dim=0)
    probs_E = torch.stack([s.probs_E for s in per_layer]).sum(dim=0)
    n = torch.stack([s.tokens for s in per_layer]).sum().clamp(min=1)
    return (hits_E / n * probs_E / n).sum() * num_experts * coef * per_layer[0].group_size
