"""DeepSeek V2's MoE block: fp32 softmax router (greedy or group-limited top-k), routed experts in
the ``shard`` or ``origin`` layout (``models/common/experts.py``), shared experts, balance loss.

Shapes: T tokens, D hidden, E routed experts, K experts per token, G expert groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.models.common.experts import balance_loss, dispatch_and_combine, routed_experts
from moe_train.models.common.mlp import SwiGLUMLP
from moe_train.models.deepseek_v2.config import DeepseekV2Config


class Router(nn.Module):
    """Softmax gate in fp32 with greedy or group-limited top-k selection."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.initializer_range)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns scores (T, E) fp32, top-k weights (T, K) fp32 and expert indices (T, K)."""
        cfg = self.cfg
        scores_TE = F.linear(x_TD.float(), self.weight.float()).softmax(dim=-1)
        candidates = scores_TE
        if cfg.topk_method == "group_limited_greedy":
            T, G = scores_TE.shape[0], cfg.n_group
            group_best_TG = scores_TE.view(T, G, -1).amax(dim=-1)
            keep_group = torch.zeros_like(group_best_TG, dtype=torch.bool)
            keep_group.scatter_(1, group_best_TG.topk(cfg.topk_group, dim=-1).indices, True)
            keep_TE = keep_group[:, :, None].expand(T, G, cfg.n_routed_experts // G).reshape(T, -1)
            candidates = scores_TE.masked_fill(~keep_TE, 0.0)
        weight_TK, index_TK = candidates.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)
        # Exclusive branches, as DeepSeek's code: normalise only when top_k > 1 and norm_topk_prob.
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weight_TK = weight_TK * cfg.routed_scaling_factor
        return scores_TE, weight_TK, index_TK


class MoE(nn.Module):
    router_cls: type = Router  # DeepSeek V3 reuses the block with its own router

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = self.router_cls(cfg)
        self.experts = routed_experts(
            cfg.moe_implementation,
            cfg.n_routed_experts,
            cfg.shard_size,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.initializer_range,
        )
        if cfg.n_shared_experts:
            self.shared_experts = SwiGLUMLP(
                cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.initializer_range
            )
        # Sequence parallelism sets the group whose ranks share each row, for the balance loss.
        self.balance_group: dist.ProcessGroup | None = None

    def forward(
        self, x_BTD: torch.Tensor, segment_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``segment_T``: each token's sequence (-1: padding; default: its row).  Returns output
        (B, T, D), the balance loss (training only) and tokens per expert (E,) over the real tokens."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        if segment_T is None:
            segment_T = torch.arange(B, device=x_BTD.device).repeat_interleave(T)
        x_TD = x_BTD.reshape(-1, D)
        scores_TE, weight_TK, index_TK = self.gate(x_TD)
        out_TD, _ = dispatch_and_combine(self.experts, x_TD, weight_TK, index_TK, cfg.n_routed_experts)
        if cfg.n_shared_experts:
            out_TD = out_TD + self.shared_experts(x_TD)
        real = segment_T >= 0
        load_E = torch.bincount(index_TK[real].reshape(-1), minlength=cfg.n_routed_experts)
        aux = None
        if self.training and cfg.aux_loss_alpha > 0:
            # seq_aux: per sequence; otherwise the whole batch is one sequence.
            segment = segment_T if cfg.seq_aux else torch.where(real, 0, -1)
            aux = balance_loss(scores_TE, index_TK, segment, cfg.aux_loss_alpha, self.balance_group)
        return out_TD.view_as(x_BTD), aux, load_E
