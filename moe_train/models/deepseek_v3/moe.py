"""DeepSeek V3's router (sigmoid scores, ``noaux_tc`` group-limited top-k with a correction bias) and
its aux-loss-free balancing: the bias update the trainer applies after each optimiser step.  The MoE
block around the router (routed and shared experts, balance loss) is ``models/common/moe.py``.

Shapes: T tokens, D hidden, E routed experts, K experts per token, G expert groups, L MoE layers.

The correction bias steers selection only: a token's experts are the top-k of ``sigmoid + bias``
inside the ``topk_group`` best groups, while its weights come from the unbiased sigmoid scores.
The bias is no gradient parameter but a buffer: kept whole (never ZeRO-partitioned) and in fp32 on
every rank, so an update computed from the globally reduced expert load is identical everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.models.deepseek_v3.config import DeepseekV3Config


class NoAuxRouter(nn.Module):
    """Sigmoid gate in fp32 with the correction bias added for selection only (transformers' numerics)."""

    def __init__(self, cfg: DeepseekV3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.initializer_range)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16 must leave the bias fp32: its updates (~1e-3) vanish in bf16.
        super()._apply(fn, recurse)
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the balance loss's scores (T, E) fp32 (sigmoid normalised per token), top-k weights
        (T, K) fp32 and expert indices (T, K)."""
        cfg = self.cfg
        T, E, G = x_TD.shape[0], cfg.n_routed_experts, cfg.n_group
        scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        biased_TE = scores_TE + self.e_score_correction_bias.float()
        group_TG = biased_TE.view(T, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
        keep_TE = keep_TG[:, :, None].expand(T, G, E // G).reshape(T, E)
        index_TK = (
            biased_TE.masked_fill(~keep_TE, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        )
        weight_TK = scores_TE.gather(1, index_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weight_TK = weight_TK * cfg.routed_scaling_factor  # V3 scales in both cases (unlike V2)
        # The sequence-wise balance loss of the V3 report takes the affinities normalised per token.
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True), weight_TK, index_TK


@torch.no_grad()
def update_correction_bias(model: nn.Module, load_LE: torch.Tensor, rate: float) -> dict[str, Any]:
    """After an optimiser step: bias += rate * sign(mean load - load) in every MoE layer.

    ``load_LE`` is the step's token count per expert of each MoE layer, summed over all ranks (the
    model's ``expert_load``, in layer order), so every rank applies the same update.  ``rate`` 0 leaves
    the bias unchanged.  Returns the largest |bias| of each layer, for the step's metrics line.
    """
    routers = [m for m in model.modules() if isinstance(m, NoAuxRouter)]
    if load_LE.shape[0] != len(routers):
        raise ValueError(f"expert load has {load_LE.shape[0]} layers but the model has {len(routers)} routers")
    out = []
    for router, load_E in zip(routers, load_LE, strict=True):
        bias = router.e_score_correction_bias
        if rate:
            load_E = load_E.to(device=bias.device, dtype=torch.float32)
            bias.add_(torch.sign(load_E.mean() - load_E), alpha=rate)
        out.append(round(bias.abs().max().item(), 6))
    return {"correction_bias_absmax": out}
