"""Routed + shared experts of DeepSeek V2, in two memory layouts.

Shapes: T tokens, D hidden, E routed experts, S experts per shard, F moe_intermediate_size,
K experts per token (top-k), A = T*K token-expert assignments.

``shard`` (default): the E experts are stacked into E/S shard modules, each holding one
``gate_up_proj`` (S, 2F, D) and one ``down_proj`` (S, D, F) parameter.  Under ZeRO-3 that is 2
gathers per shard instead of 3 per expert, and every shard module runs on every forward, even
with no tokens, so all ranks join the same gathers whatever the routing.

``origin``: one MLP module per expert as in DeepSeek's remote code (the benchmark baseline).  It
too calls every expert on every forward: skipping idle experts makes ZeRO-3 ranks disagree on
which parameters to gather, which hangs NCCL (and errors on gloo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.models.deepseek_v2.attention import _linear
from moe_train.models.deepseek_v2.config import DeepseekV2Config


class MLP(nn.Module):
    """SwiGLU feed-forward; the dense layers, each shared expert block and each `origin` expert."""

    def __init__(self, cfg: DeepseekV2Config, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = _linear(cfg, cfg.hidden_size, intermediate_size)
        self.up_proj = _linear(cfg, cfg.hidden_size, intermediate_size)
        self.down_proj = _linear(cfg, intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weight_TK = weight_TK * cfg.routed_scaling_factor
        return scores_TE, weight_TK, index_TK


def balance_loss(cfg: DeepseekV2Config, scores_TE: torch.Tensor, index_TK: torch.Tensor,
                 segment_T: torch.Tensor | None) -> torch.Tensor:
    """DeepSeek's auxiliary balance loss: alpha * sum_e f_e * P_e.

    f_e is the fraction of assignments routed to expert e (scaled so uniform routing gives 1)
    and P_e the mean router probability.  With ``seq_aux`` both are taken per sequence (per
    packed sample, given by ``segment_T``) and the result averaged over sequences.
    """
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    T = scores_TE.shape[0]
    if segment_T is None or not cfg.seq_aux:
        segment_T = torch.zeros(T, dtype=torch.long, device=scores_TE.device)
    n_seg = int(segment_T.max()) + 1
    tokens_S = torch.bincount(segment_T, minlength=n_seg).clamp(min=1).float()
    hits_SE = torch.zeros(n_seg, E, device=scores_TE.device)
    hits_SE.index_put_((segment_T[:, None].expand(T, K).reshape(-1), index_TK.reshape(-1)),
                       torch.ones(T * K, device=scores_TE.device), accumulate=True)
    f_SE = hits_SE * E / (tokens_S[:, None] * K)
    P_SE = torch.zeros(n_seg, E, device=scores_TE.device).index_add_(0, segment_T, scores_TE) / tokens_S[:, None]
    return (f_SE * P_SE).sum(dim=1).mean() * cfg.aux_loss_alpha


class _GroupedLinear(torch.autograd.Function):
    """y[rows of expert s] = x[rows of expert s] @ w[s].T for a stack w (S, O, I).

    A hand-written backward keeps one (S, O, I) gradient buffer instead of the S full-size
    zero-filled gradients that indexing w[s] inside autograd would create.
    """

    @staticmethod
    def forward(ctx, x_AI: torch.Tensor, w_SOI: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_AI, w_SOI, counts_S)
        return _grouped_mm(x_AI, w_SOI.transpose(1, 2), counts_S)

    @staticmethod
    def backward(ctx, grad_AO: torch.Tensor):
        x_AI, w_SOI, counts_S = ctx.saved_tensors
        grad_AO = grad_AO.contiguous()
        grad_x = _grouped_mm(grad_AO, w_SOI, counts_S) if ctx.needs_input_grad[0] else None
        grad_w = _grouped_weight_grad(grad_AO, x_AI, counts_S) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _use_grouped_mm(*tensors: torch.Tensor) -> bool:
    """torch's grouped_mm wants 16-byte aligned pointers and strides, fp32/bf16 on CPU and bf16 on
    CUDA; other cases (small debug sizes, fp32 on GPU, fp64) take an exact loop over the experts."""
    def aligned(t: torch.Tensor) -> bool:
        return t.data_ptr() % 16 == 0 and all(s == 1 or s * t.element_size() % 16 == 0 for s in t.stride())

    if not hasattr(F, "grouped_mm"):
        return False
    allowed = (torch.bfloat16,) if tensors[0].is_cuda else (torch.float32, torch.bfloat16)
    if tensors[0].dtype not in allowed:
        return False
    return all(aligned(t) for t in tensors)


def _grouped_mm(x_AI: torch.Tensor, w_SIO: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    if _use_grouped_mm(x_AI, w_SIO):
        offs = counts_S.cumsum(0).to(torch.int32)
        return F.grouped_mm(x_AI, w_SIO, offs=offs)
    out = x_AI.new_empty(x_AI.shape[0], w_SIO.shape[2])
    start = 0
    for s, n in enumerate(counts_S.tolist()):
        torch.mm(x_AI[start:start + n], w_SIO[s], out=out[start:start + n])
        start += n
    return out


def _grouped_weight_grad(grad_AO: torch.Tensor, x_AI: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    """(S, O, I) with [s] = grad[rows of s].T @ x[rows of s]."""
    gT = grad_AO.t()
    if _use_grouped_mm(gT, x_AI):
        return F.grouped_mm(gT, x_AI, offs=counts_S.cumsum(0).to(torch.int32))
    out = grad_AO.new_zeros(len(counts_S), grad_AO.shape[1], x_AI.shape[1])
    start = 0
    for s, n in enumerate(counts_S.tolist()):
        if n:
            torch.mm(gT[:, start:start + n], x_AI[start:start + n], out=out[s])
        start += n
    return out


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of a fused (A, 2F) gate_up, in the order autograd would compute it.

    Keeps only gate_up for backward (autograd would also keep silu(gate), another (A, F)) and
    writes both halves of the gradient into one (A, 2F) buffer instead of concatenating them.
    """

    @staticmethod
    def forward(ctx, gate_up_AF2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up_AF2)
        gate, up = gate_up_AF2.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_AF: torch.Tensor) -> torch.Tensor:
        (gate_up_AF2,) = ctx.saved_tensors
        gate, up = gate_up_AF2.chunk(2, dim=-1)
        grad_AF2 = torch.empty_like(gate_up_AF2)
        grad_gate, grad_up = grad_AF2.chunk(2, dim=-1)
        torch.mul(grad_AF, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_AF * up, gate, grad_input=grad_gate)
        return grad_AF2


class ExpertShard(nn.Module):
    """S routed experts stacked: gate and up fused in one (S, 2F, D) parameter, down in (S, D, F)."""

    def __init__(self, cfg: DeepseekV2Config, num_experts: int) -> None:
        super().__init__()
        F_, D = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(num_experts, D, F_))
        nn.init.normal_(self.gate_up_proj, std=cfg.initializer_range)
        nn.init.normal_(self.down_proj, std=cfg.initializer_range)

    def forward(self, x_AD: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
        """x_AD: the assignments of this shard sorted by expert; counts_S: rows per expert."""
        h_AF = _SwiGLU.apply(_GroupedLinear.apply(x_AD, self.gate_up_proj, counts_S))
        return _GroupedLinear.apply(h_AF, self.down_proj, counts_S)


class ShardedExperts(nn.ModuleList):
    """E/S shards; parameter names `{shard}.gate_up_proj`, `{shard}.down_proj`."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__(ExpertShard(cfg, cfg.shard_size) for _ in range(cfg.num_shards))
        self.shard_size = cfg.shard_size

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if len(self) == 1:  # all experts in one shard: no split, and no copy into a concatenation
            return self[0](x_AD, counts_E)
        counts_per_shard = counts_E.view(len(self), self.shard_size)
        rows = counts_per_shard.sum(dim=1).tolist()  # the one host sync of the layer
        return torch.cat([shard(x, c) for shard, x, c in zip(self, x_AD.split(rows), counts_per_shard)])


class PerExpertModules(nn.ModuleList):
    """`origin`: one MLP per expert; parameter names identical to DeepSeek's checkpoints."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert(x) for expert, x in zip(self, x_AD.split(counts_E.tolist()))])


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = ShardedExperts(cfg) if cfg.moe_implementation == "shard" else PerExpertModules(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x_BTD: torch.Tensor, segment_T: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns output (B, T, D), the balance loss (training only) and tokens per expert (E,)."""
        cfg = self.cfg
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        scores_TE, weight_TK, index_TK = self.gate(x_TD)
        # Sort the T*K assignments by expert once; every expert then reads a contiguous block.
        flat_A = index_TK.reshape(-1)
        order_A = flat_A.argsort(stable=True)
        token_A = order_A // cfg.num_experts_per_tok
        counts_E = torch.bincount(flat_A, minlength=cfg.n_routed_experts)
        y_AD = self.experts(x_TD[token_A], counts_E)
        # Weighted sum of each token's K expert outputs in fp32 (weights are fp32), one cast at the
        # end, as DeepSeek's code does; casting each term to bf16 first would round K times.
        y_AD = y_AD * weight_TK.reshape(-1)[order_A, None]
        out_TD = torch.zeros_like(x_TD, dtype=y_AD.dtype).index_add_(0, token_A, y_AD).to(x_TD.dtype)
        if cfg.n_shared_experts:
            out_TD = out_TD + self.shared_experts(x_TD)
        aux = None
        if self.training and cfg.aux_loss_alpha > 0:
            aux = balance_loss(cfg, scores_TE, index_TK, segment_T)
        return out_TD.view_as(x_BTD), aux, counts_E
