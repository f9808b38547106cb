"""The MoE block of the DeepSeek families (V2, V3, Kimi K2, Moonlight): a family's router, routed experts
in the ``shard`` or ``origin`` layout (``models/common/experts.py``), shared experts, and DeepSeek's
(sequence) balance loss.

Shapes: B batch, T tokens, D hidden, E routed experts, K experts per token.

The block reads the config through ``num_experts``, ``expert_intermediate_size``, ``hidden_size``,
``initializer_range`` and DeepSeek's ``n_shared_experts``, ``aux_loss_alpha``, ``seq_aux``.  The router is
a module ``x_TD -> (scores_TE fp32 for the balance loss, weight_TK fp32, index_TK)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_train.models.common.experts import ExpertLayout, balance_loss, dispatch_and_combine, routed_experts
from moe_train.models.common.key_map import LAYER
from moe_train.models.common.mlp import SwiGLUMLP

# Our parameter names inside a decoder layer, equal to the HF keys; and the stacked experts of the
# ``shard`` layout (``models/common/key_map.py``): shard s of layer l holds its experts' gate and up rows
# in ``model.layers.{l}.mlp.experts.{s}.gate_up_proj`` (S, 2F, D), their down projections in ``...down_proj`` (S, D, F).
MOE_KEYS = [
    "mlp.gate.weight",  # the router
    "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
    # `origin`: one module per expert
    "mlp.experts.{}.gate_proj.weight",
    "mlp.experts.{}.up_proj.weight",
    "mlp.experts.{}.down_proj.weight",
]
STACKED_EXPERT_KEYS = {
    LAYER + "mlp.experts.{}.gate_up_proj": [
        (LAYER + "mlp.experts.{}.gate_proj.weight", 0),
        (LAYER + "mlp.experts.{}.up_proj.weight", 1),
    ],
    LAYER + "mlp.experts.{}.down_proj": [(LAYER + "mlp.experts.{}.down_proj.weight", None)],
}


class MoE(nn.Module):
    def __init__(self, cfg, layout: ExpertLayout, router: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = router
        self.experts = routed_experts(
            layout, cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.initializer_range
        )
        if cfg.n_shared_experts:
            self.shared_experts = SwiGLUMLP(
                cfg.hidden_size, cfg.expert_intermediate_size * cfg.n_shared_experts, cfg.initializer_range
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
        E = cfg.num_experts
        if segment_T is None:
            segment_T = torch.arange(B, device=x_BTD.device).repeat_interleave(T)
        x_TD = x_BTD.reshape(-1, D)
        scores_TE, weight_TK, index_TK = self.gate(x_TD)
        shared = self.shared_experts if cfg.n_shared_experts else None  # routed + shared, in that order
        out_TD, _ = dispatch_and_combine(self.experts, x_TD, weight_TK, index_TK, E, shared)
        real = segment_T >= 0
        load_E = torch.bincount(index_TK[real].reshape(-1), minlength=E)
        aux = None
        if self.training and cfg.aux_loss_alpha > 0:
            # seq_aux: per sequence; otherwise the whole batch is one sequence.
            segment = segment_T if cfg.seq_aux else torch.where(real, 0, -1)
            aux = balance_loss(scores_TE, index_TK, segment, cfg.aux_loss_alpha, self.balance_group)
        return out_TD.view_as(x_BTD), aux, load_E
