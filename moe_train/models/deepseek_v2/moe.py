"""DeepSeek V2's router: fp32 softmax, greedy or group-limited top-k.  The MoE block around it (routed
and shared experts, balance loss) is ``models/common/moe.py``.

Shapes: T tokens, D hidden, E routed experts, K experts per token, G expert groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
