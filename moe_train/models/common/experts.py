"""Routed experts in two memory layouts, token dispatch, and the sequence balance loss.

Shapes: T tokens, D hidden, E routed experts, S experts per shard, F expert intermediate size,
K experts per token (top-k), A = T*K token-expert assignments, N sequences (samples) in a batch.

``ExpertLayout`` picks one of two memory layouts; it is a training choice, not part of a checkpoint's
config.json, and is passed next to the family's config wherever a model is built.

``shard`` (default): the E experts are stacked into E/S shard modules, each holding one
``gate_up_proj`` (S, 2F, D) and one ``down_proj`` (S, D, F) parameter.  Under ZeRO-3 that is 2
gathers per shard instead of 3 per expert, and every shard module runs on every forward, even
with no tokens, so all ranks join the same gathers whatever the routing.

``origin``: one SwiGLU module per expert as in DeepSeek's remote code (the benchmark baseline).  It
too calls every expert on every forward: skipping idle experts makes ZeRO-3 ranks disagree on
which parameters to gather, which hangs NCCL (and errors on gloo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.models.common import grouped_gemm
from moe_train.models.common.grouped_gemm import padded_size
from moe_train.models.common.mlp import SwiGLUMLP

MOE_IMPLEMENTATIONS = ("shard", "origin")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ExpertLayout:
    """How a layer's routed experts sit in memory: ``shard`` modules of ``expert_in_one_shard`` experts
    each (None: all of the layer's in one), or ``origin``, one module per expert."""

    moe_implementation: str = "shard"
    expert_in_one_shard: int | None = None

    def __post_init__(self) -> None:
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation={self.moe_implementation!r} is unknown; use one of {list(MOE_IMPLEMENTATIONS)}"
            )

    def shard_size(self, num_experts: int) -> int:
        """Experts per shard of a layer of ``num_experts``."""
        return self.expert_in_one_shard or num_experts

    def num_shards(self, num_experts: int) -> int:
        return num_experts // self.shard_size(num_experts)

    def check(self, num_experts: int | None) -> None:
        """Raise ValueError (one line, the valid values) when the shard size does not divide the experts."""
        s = self.expert_in_one_shard
        if num_experts is not None and s is not None and (s < 1 or num_experts % s):
            raise ValueError(
                f"expert_in_one_shard={s} does not divide the {num_experts} routed experts of a layer; "
                f"use one of {_divisors(num_experts)}"
            )


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


def _use_grouped_mm(x: torch.Tensor) -> bool:
    """torch's grouped_mm takes fp32/bf16 on CPU and bf16 on CUDA (misaligned operands are padded by
    ``models/common/grouped_gemm.py``); other cases (fp32 on GPU, fp64) take an exact loop over the experts."""
    if not hasattr(F, "grouped_mm"):
        return False
    return x.dtype in ((torch.bfloat16,) if x.is_cuda else (torch.float32, torch.bfloat16))


def expert_kernel(device_type: str, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> tuple[str, str]:
    """("grouped_mm" or "loop", why) for expert GEMMs of these sizes: what ``_use_grouped_mm`` will decide."""
    if not hasattr(F, "grouped_mm"):
        return "loop", f"torch {torch.__version__} has no torch.nn.functional.grouped_mm; use torch >= 2.9"
    allowed = (torch.bfloat16,) if device_type == "cuda" else (torch.float32, torch.bfloat16)
    if dtype not in allowed:
        return "loop", f"grouped_mm on {device_type} takes {[str(d) for d in allowed]}, not {dtype}; train in bf16"
    padded = [
        f"{name}={n}"
        for name, n in (("hidden_size", hidden_size), ("moe_intermediate_size", intermediate_size))
        if padded_size(n, dtype) != n
    ]
    why = f"torch.nn.functional.grouped_mm, {dtype} on {device_type}"
    return "grouped_mm", why + (f"; {', '.join(padded)} zero-padded to 16-byte rows per call" if padded else "")


def _grouped_mm(x_AI: torch.Tensor, w_SIO: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    if _use_grouped_mm(x_AI):
        return grouped_gemm.grouped_mm(x_AI, w_SIO, counts_S)
    out = x_AI.new_empty(x_AI.shape[0], w_SIO.shape[2])
    start = 0
    for s, n in enumerate(counts_S.tolist()):
        torch.mm(x_AI[start : start + n], w_SIO[s], out=out[start : start + n])
        start += n
    return out


def _grouped_weight_grad(grad_AO: torch.Tensor, x_AI: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    """(S, O, I) with [s] = grad[rows of s].T @ x[rows of s]."""
    if _use_grouped_mm(x_AI):
        return grouped_gemm.grouped_weight_grad(grad_AO, x_AI, counts_S)
    gT = grad_AO.t()
    out = grad_AO.new_zeros(len(counts_S), grad_AO.shape[1], x_AI.shape[1])
    start = 0
    for s, n in enumerate(counts_S.tolist()):
        if n:
            torch.mm(gT[:, start : start + n], x_AI[start : start + n], out=out[s])
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

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, std: float) -> None:
        super().__init__()
        F_, D = intermediate_size, hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(num_experts, D, F_))
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def forward(self, x_AD: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
        """x_AD: the assignments of this shard sorted by expert; counts_S: rows per expert."""
        h_AF = _SwiGLU.apply(_GroupedLinear.apply(x_AD, self.gate_up_proj, counts_S))
        return _GroupedLinear.apply(h_AF, self.down_proj, counts_S)


class ShardedExperts(nn.ModuleList):
    """E/S shards; parameter names `{shard}.gate_up_proj`, `{shard}.down_proj`."""

    def __init__(self, num_experts: int, shard_size: int, hidden_size: int, intermediate_size: int, std: float) -> None:
        super().__init__(
            ExpertShard(shard_size, hidden_size, intermediate_size, std) for _ in range(num_experts // shard_size)
        )
        self.shard_size = shard_size

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if len(self) == 1:  # all experts in one shard: no split, and no copy into a concatenation
            return self[0](x_AD, counts_E)
        counts_per_shard = counts_E.view(len(self), self.shard_size)
        rows = counts_per_shard.sum(dim=1).tolist()  # the one host sync of the layer
        return torch.cat([shard(x, c) for shard, x, c in zip(self, x_AD.split(rows), counts_per_shard)])


class PerExpertModules(nn.ModuleList):
    """`origin`: one SwiGLU MLP per expert; parameter names identical to DeepSeek's checkpoints."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, std: float) -> None:
        super().__init__(SwiGLUMLP(hidden_size, intermediate_size, std) for _ in range(num_experts))

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert(x) for expert, x in zip(self, x_AD.split(counts_E.tolist()))])


def routed_experts(
    layout: ExpertLayout, num_experts: int, hidden_size: int, intermediate_size: int, std: float
) -> nn.Module:
    layout.check(num_experts)
    if layout.moe_implementation == "shard":
        return ShardedExperts(num_experts, layout.shard_size(num_experts), hidden_size, intermediate_size, std)
    return PerExpertModules(num_experts, hidden_size, intermediate_size, std)


def dispatch_and_combine(
    experts: nn.Module,
    x_TD: torch.Tensor,
    weight_TK: torch.Tensor,
    index_TK: torch.Tensor,
    num_experts: int,
    alongside: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token through its K experts, weighted and summed, plus ``alongside(x_TD)`` (the shared experts:
    work on the same tokens that does not depend on the routing); returns (out (T, D), tokens per expert (E,)).

    The T*K assignments are sorted by expert once, so every expert reads a contiguous block.  Experts
    that move the tokens themselves (``takes_routing``: expert parallelism, applied from outside the
    model) take the tokens, their routing and ``alongside`` whole and return the combined output; they
    may run ``alongside`` while the tokens travel.
    """
    K = index_TK.shape[1]
    flat_A = index_TK.reshape(-1)
    counts_E = torch.bincount(flat_A, minlength=num_experts)
    if getattr(experts, "takes_routing", False):
        return experts(x_TD, weight_TK, index_TK, alongside), counts_E
    order_A = flat_A.argsort(stable=True)
    token_A = order_A // K
    y_AD = experts(x_TD[token_A], counts_E)
    # Weighted sum of each token's K expert outputs in fp32 (weights are fp32), one cast at the
    # end, as DeepSeek's code does; casting each term to bf16 first would round K times.
    y_AD = y_AD * weight_TK.reshape(-1)[order_A, None]
    out_TD = torch.zeros_like(x_TD, dtype=y_AD.dtype).index_add_(0, token_A, y_AD).to(x_TD.dtype)
    if alongside is not None:
        out_TD = out_TD + alongside(x_TD)
    return out_TD, counts_E


def balance_loss(
    scores_TE: torch.Tensor,
    index_TK: torch.Tensor,
    segment_T: torch.Tensor,
    alpha: float,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """DeepSeek's auxiliary balance loss: alpha * mean over sequences of sum_e f_e * P_e.

    f_e is the fraction of a sequence's assignments routed to expert e (scaled so uniform routing
    gives 1) and P_e its mean router probability.  ``segment_T`` gives each token's sequence (-1:
    padding, left out).  With ``group`` (sequence parallelism) this rank holds a slice of the rows
    that every rank of the group shares: the counts (no gradient) are summed over the group, each
    rank adds its slice's share of P, and the share is multiplied by the group size because the
    gradient average over the world divides by it; the shares add up to the whole rows' loss.
    """
    E, K = scores_TE.shape[1], index_TK.shape[1]
    real = segment_T >= 0
    scores_TE, index_TK, segment_T = scores_TE[real], index_TK[real], segment_T[real]
    n_seg = torch.zeros((), dtype=torch.long, device=scores_TE.device)
    if segment_T.numel():
        n_seg = segment_T.max() + 1
    if group is not None:
        dist.all_reduce(n_seg, op=dist.ReduceOp.MAX, group=group)
    n_seg = max(int(n_seg), 1)
    T = segment_T.numel()
    counts = torch.zeros(n_seg, E + 1, device=scores_TE.device)  # hits per expert, then tokens
    counts.index_put_(
        (segment_T[:, None].expand(T, K).reshape(-1), index_TK.reshape(-1)),
        torch.ones(T * K, device=scores_TE.device),
        accumulate=True,
    )
    counts[:, E].index_add_(0, segment_T, torch.ones(T, device=scores_TE.device))
    size = 1
    if group is not None:
        dist.all_reduce(counts, group=group)
        size = dist.get_world_size(group)
    hits_SE, tokens_S = counts[:, :E], counts[:, E].clamp(min=1)
    f_SE = hits_SE * E / (tokens_S[:, None] * K)
    P_SE = torch.zeros(n_seg, E, device=scores_TE.device).index_add_(0, segment_T, scores_TE) / tokens_S[:, None]
    return (f_SE * P_SE).sum(dim=1).mean() * alpha * size
