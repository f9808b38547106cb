"""Expert parallelism (``--ep N``) under ZeRO-3: tokens move to the experts, the experts stay.

Layout.  The world is cut into EP groups of N consecutive ranks (DeepSpeed's ``ep_size_N`` groups).
Rank r of a group keeps experts [r*E/N, (r+1)*E/N) of every MoE layer, stacked in shards as in the
``shard`` layout, and ZeRO-3 partitions those local experts only over the rank's expert-data-parallel
group (the world/N ranks with the same EP rank).  Dense parameters (attention, shared experts,
embeddings, router) stay under plain ZeRO-3 over the whole world.  Shard modules keep their global
index as name (``mlp.experts.{shard}.gate_up_proj``), so the HF key map, the byte-range loader and the
export read each rank's experts with no EP-specific key handling.

Forward of one layer (``ExpertParallelShards``; ``dispatch_and_combine`` hands it the tokens and
their routing): one all-to-all of the rows each rank sends to each other, one of the routing rows
(weights and expert ids), one of the token rows, each token once per rank holding any of its
experts; the receiving rank sorts its assignments by local expert (one gather of the received rows),
runs the local grouped GEMMs, sums each token's weighted expert outputs and sends one row back.
Every rank makes the same calls whatever the routing (zero-size splits are sent as such) and runs
every local shard even with no rows, so skew never desynchronises the collectives or ZeRO-3's
gathers.  Dropless: no capacity factor; a rank receives at most N * T rows per layer (every token
of its group) and expands them to at most N * T * min(K, E/N) assignments, against T * K without
EP; that is the worst-case dispatch buffer.

Router, balance loss and ``expert_load`` telemetry stay DeepSeek's code in the model: each packed
sample lives on one rank (without sequence parallelism), so the per-sample balance loss over the
global routing of a sample is the rank's own, exactly as with EP=1.

Why DeepSpeed's pieces and not AutoEP's layer.  AutoEP (``deepspeed.module_inject.auto_ep``) replaces
the whole MoE block inside ``deepspeed.initialize``: its router is not DeepSeek's (no
group_limited_greedy, no balance loss; its DeepSeek preset rejects ``load_balance_coeff``), it runs
after our byte-range load, and it expects one fused (E, 2F, D) ``experts.gate_up_proj``.  What we
take from DeepSpeed 0.19.8 is the rest: its expert / expert-data-parallel process groups
(``deepspeed.utils.groups._create_expert_and_data_parallel``) and ZeRO-3's partitioning of expert
parameters over the expert-data-parallel group.  ZeRO-3 applies the latter to any parameter tagged
as AutoEP tags its experts (``ds_zero_placement_family = "autoep_expert"``, the EP group name, and
``ds_zero_partition_process_group`` set before ``zero.Init`` converts the parameter): it then
reduce-scatters their gradients over the expert-data-parallel group, averages them over the whole
world (every token of the world contributes), keeps them in optimizer sub-groups of their own and
adds the EP group to the global gradient norm used for clipping.  Those attributes are DeepSpeed
internals: ``check_deepspeed`` refuses a DeepSpeed without them and ``tests/test_ep.py`` pins the
contract (partition group, gradient averaging, norm) against EP=1.  Our model has no module
DeepSpeed recognises as MoE, so ``_validate_zero3_moe_compatibility`` (AutoEP-only on ZeRO-3) does not
apply; its restrictions (no DeepSpeed SP, hpZ or quantized gradients) are checked by
``ParallelDims.validate`` (``parallel/dims.py``) with the rest of what EP needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_train.models.common.experts import ExpertShard
from moe_train.models.common.spec import spec_of
from moe_train.parallel import zero3

PLACEMENT_FAMILY = "autoep_expert"  # DeepSpeed 0.19.8's ZeRO-3 placement family of expert parameters


def check_deepspeed() -> None:
    """The DeepSpeed internals EP relies on are there (see the module docstring)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.utils import groups

    needed = [
        hasattr(DeepSpeedZeroOptimizer_Stage3, "_autoep_expert_parallel_group"),
        hasattr(groups, "_create_expert_and_data_parallel"),
        hasattr(groups, "_get_expert_data_parallel_group"),
    ]
    if not all(needed):
        import deepspeed

        raise ValueError(
            f"--ep needs DeepSpeed's ZeRO-3 expert partitioning (0.19.8), found deepspeed "
            f"{deepspeed.__version__}; install deepspeed==0.19.8 or use --ep 1"
        )


@dataclass
class EPGroups:
    """This rank's expert-parallel group (N consecutive ranks) and expert-data-parallel group."""

    size: int
    name: str
    ep: dist.ProcessGroup
    edp: dist.ProcessGroup
    hold: bool = False  # keep the local experts gathered over ``edp`` until the optimizer step (--hold-experts)

    @property
    def rank(self) -> int:
        return dist.get_rank(group=self.ep)

    def global_rank(self, ep_rank: int) -> int:
        return dist.get_global_rank(self.ep, ep_rank)


def create_groups(ep: int, hold: bool = False) -> EPGroups:
    """DeepSpeed's ``ep_size_{ep}`` groups (created once; every rank must call this)."""
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep)
    name = f"ep_size_{ep}"
    edp = groups._get_expert_data_parallel_group(name)
    return EPGroups(ep, name, groups._get_expert_parallel_group(name), edp, hold)


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` split ``send`` per rank of ``group``; returns the rows received, ``recv`` per rank.
    Backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _StartAllToAll(torch.autograd.Function):
    """Starts the all-to-all of ``x`` and returns its receive buffer, not yet filled: ``_WaitAllToAll``
    completes it, so work that does not need the rows runs in between.  Backward mirrors the pair: the
    wait's backward starts the gradients' all-to-all, this backward completes it (autograd runs the work
    created between the two in forward, such as the shared experts' backward, in between)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup, pending: list):
        ctx.pending = pending
        out = x.new_empty(sum(recv), *x.shape[1:])
        pending.append(dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=True))
        return out

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        work, back, _ = ctx.pending.pop()  # the gradients' all-to-all the wait's backward started
        work.wait()
        return back, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Completes the all-to-all ``_StartAllToAll`` started; see there."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup, pending: list):
        ctx.recv, ctx.send, ctx.group, ctx.pending = recv, send, group, pending
        pending.pop().wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back, grad = grad.new_empty(sum(ctx.send), *grad.shape[1:]), grad.contiguous()
        work = dist.all_to_all_single(back, grad, ctx.send, ctx.recv, group=ctx.group, async_op=True)
        ctx.pending.append((work, back, grad))  # grad kept alive until the all-to-all completes
        return grad, None, None, None, None  # passed on to the start's backward, which returns ``back``


class LocalExpertShard(ExpertShard):
    """An ExpertShard whose parameters ZeRO-3 partitions over the expert-data-parallel group.

    The tags are set in ``__init__``: ``zero.Init`` converts a module's parameters when its
    outermost ``__init__`` returns, and reads ``ds_zero_partition_process_group`` then."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, std: float, groups: EPGroups
    ) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size, std)
        place([self.gate_up_proj, self.down_proj], groups)


def place(params: list[nn.Parameter], groups: EPGroups) -> None:
    """Tag expert parameters (a local shard's, or its LoRA adapters') for ZeRO-3 to partition them over the
    expert-data-parallel group; before the ``__init__`` creating them returns (see ``LocalExpertShard``)."""
    for p in params:
        p.allreduce = False
        p.group_name = groups.name
        p.ds_zero_placement_family = PLACEMENT_FAMILY
        p.ds_zero_partition_group_name = groups.name
        p.ds_zero_partition_process_group = groups.edp


class ExpertParallelShards(nn.ModuleDict):
    """This rank's E/N experts of a layer as shards named by their global index; forward takes every
    token of this rank with its routing and returns the tokens' combined expert outputs.

    Shapes (besides the legend of ``models/common/experts.py``): N ranks in the EP group, L = E/N
    local experts, P (token, destination rank) pairs this rank sends, R rows it receives.
    """

    takes_routing = True  # dispatch_and_combine hands over the tokens and their routing whole

    def __init__(
        self, num_experts: int, shard_size: int, hidden_size: int, intermediate_size: int, std: float, groups: EPGroups
    ) -> None:
        local_shards = num_experts // groups.size // shard_size
        first = groups.rank * local_shards
        super().__init__(
            {
                str(first + i): LocalExpertShard(shard_size, hidden_size, intermediate_size, std, groups)
                for i in range(local_shards)
            }
        )
        self.num_experts, self.shard_size, self.groups = num_experts, shard_size, groups
        # N = world: ZeRO-3's "gathers" would be views plus hooks; --hold-experts: one gather per step
        if groups.hold or dist.get_world_size(group=groups.edp) == 1:
            zero3.mark_whole(self)

    def forward(
        self,
        x_TD: torch.Tensor,
        weight_TK: torch.Tensor,
        index_TK: torch.Tensor,
        alongside: nn.Module | None = None,
    ) -> torch.Tensor:
        """A token goes once to each rank that holds any of its experts (not once per expert), with
        its K weights and expert ids; that rank runs the token through its experts, sums their
        weighted outputs and sends one row back.  With top-6 of 64 experts on 2 ranks a token
        reaches about 2 ranks: 3x fewer rows cross each of the four all-to-alls of a layer
        (dispatch and combine, forward and backward) than one row per assignment.  The combined
        rows travel in fp32 (the weights' dtype), so that each token's sum is cast once, as in
        ``dispatch_and_combine``: with bf16 activations the combine moves 1.5x fewer bytes, not 3x.

        ``alongside`` (the shared experts) runs while the dispatch travels: the routing and token rows
        are sent asynchronously before it and waited for after it, and in backward the rows' gradient
        all-to-all travels while its backward runs.  Its output is added last, as in
        ``dispatch_and_combine``, so the sum is the same."""
        N, group, K = self.groups.size, self.groups.ep, index_TK.shape[1]
        L = self.num_experts // N
        T = x_TD.shape[0]
        dest_TK = index_TK // L
        dest_NT = torch.zeros(N, T, dtype=torch.bool, device=x_TD.device)
        dest_NT[dest_TK.reshape(-1), torch.arange(T, device=x_TD.device).repeat_interleave(K)] = True
        # Per destination: rows (tokens) and assignments sent; the receiver learns both.
        send_N2 = torch.stack([dest_NT.sum(dim=1), torch.bincount(dest_TK.reshape(-1), minlength=N)], dim=1)
        recv_N2 = torch.empty_like(send_N2)
        dist.all_to_all_single(recv_N2, send_N2, group=group)
        sizes = torch.cat([send_N2, recv_N2]).tolist()  # the one host sync: every size below comes from it
        send, recv = [n for n, _ in sizes[:N]], [n for n, _ in sizes[N:]]
        assigned = sum(a for _, a in sizes[N:])
        # The (destination, token) pairs in that order: the first sum(send) of a stable sort, no nonzero().
        pair_P = (~dest_NT).reshape(-1).to(torch.uint8).argsort(stable=True)[: sum(send)]
        dest_P, token_P = pair_P // T, pair_P % T
        # Routing rows: the K weights (with their gradient) and expert ids (exact in fp32); the
        # assignments to other ranks get weight 0 and id -1.
        index_PK = index_TK[token_P]
        mine_PK = index_PK // L == dest_P[:, None]
        route_PK2 = torch.cat([weight_TK[token_P] * mine_PK, torch.where(mine_PK, index_PK, -1).to(weight_TK.dtype)], 1)
        # Each all-to-all in flight (forward) and its gradient's (backward) is held by its own list.
        route_RK2 = _StartAllToAll.apply(route_PK2, recv, send, group, route_pending := [])
        x_RD = _StartAllToAll.apply(x_TD[token_P], recv, send, group, x_pending := [])  # by (source rank, token)
        shared_TD = alongside(x_TD) if alongside is not None else None
        x_RD = _WaitAllToAll.apply(x_RD, recv, send, group, x_pending)
        route_RK2 = _WaitAllToAll.apply(route_RK2, recv, send, group, route_pending)
        # This rank's assignments sorted by local expert (L: not here, sorted last), then by (row, k):
        # one gather of the received rows feeds the GEMMs.
        id_RK = route_RK2[:, K:].long()
        expert_RK = torch.where(id_RK >= 0, id_RK - self.groups.rank * L, L).reshape(-1)
        flat_A = expert_RK.argsort(stable=True)[:assigned]
        row_A, k_A = flat_A // K, flat_A % K
        y_AD = self._local(x_RD[row_A], torch.bincount(expert_RK, minlength=L + 1)[:L])
        # Weighted sum per received row in fp32 (weights are fp32), in expert order, as dispatch_and_combine.
        y_AD = y_AD * route_RK2[row_A, k_A, None]
        y_RD = torch.zeros(x_RD.shape[0], x_RD.shape[1], dtype=y_AD.dtype, device=x_TD.device)
        y_PD = _AllToAll.apply(y_RD.index_add(0, row_A, y_AD), send, recv, group)
        out_TD = torch.zeros(T, x_TD.shape[1], dtype=y_PD.dtype, device=x_TD.device).index_add(0, token_P, y_PD)
        out_TD = out_TD.to(x_TD.dtype)
        return out_TD if shared_TD is None else out_TD + shared_TD

    def _local(self, x_AD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        shards = list(self.values())
        if len(shards) == 1:
            return shards[0](x_AD, counts_L)
        per_shard = counts_L.view(len(shards), self.shard_size)
        rows = per_shard.sum(dim=1).tolist()
        return torch.cat([shard(x, c) for shard, x, c in zip(shards, x_AD.split(rows), per_shard, strict=True)])


def apply(model: nn.Module, groups: EPGroups) -> nn.Module:
    """Replace every MoE block's routed experts by this rank's ``ExpertParallelShards``.

    Call it inside the ``zero3.build`` factory, so that the local shards are created under
    ``zero.Init`` (partitioned over the expert-data-parallel group from the start).  The full expert
    stacks built first are dropped; they were partitioned over the world, never whole on a rank."""
    cfg, layout = model.config, model.layout
    for module in model.modules():
        if isinstance(module, spec_of(model).moe_types):
            module.experts = ExpertParallelShards(
                cfg.num_experts,
                layout.shard_size(cfg.num_experts),
                cfg.hidden_size,
                cfg.expert_intermediate_size,
                cfg.initializer_range,
                groups,
            )
    return model


def all_experts(local_LX: torch.Tensor, groups: EPGroups) -> torch.Tensor:
    """A layer's (E, ...) tensor from this rank's (E/N, ...) rows of it, on every rank of the EP group (EP
    rank r holds experts [r*E/N, (r+1)*E/N)); for small per-expert tensors such as LoRA adapters."""
    parts = [torch.empty_like(local_LX) for _ in range(groups.size)]
    dist.all_gather(parts, local_LX.contiguous(), group=groups.ep)
    return torch.cat(parts)


def _expert_shard(name: str) -> int | None:
    """The global shard index of an expert parameter name (``...experts.{shard}.<param>``), else None."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return int(parts[-2])
    return None


def gathered_parameters(model: nn.Module, groups: EPGroups, writer: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter of the whole (EP=1) model in its order, full on global
    rank ``writer`` (other ranks get their own shards or an empty placeholder); a collective on every rank.

    A dense parameter is gathered over the world (``zero3``).  An expert shard is gathered over the
    expert-data-parallel group that owns it, and the owner in the writer's EP group sends it to the
    writer: no rank holds more than one shard beyond its own partitions.  Each tensor is valid only
    until the next item is asked for.
    """
    from moe_train.models.common.key_map import canonical_name
    from moe_train.parallel.zero3 import gathered

    with torch.device("meta"):  # the whole (EP=1) model's parameters, in order
        reference = spec_of(model).build(model.config, model.layout)
    ours = {canonical_name(name): p for name, p in model.named_parameters()}
    local_shards = len(next(m for m in model.modules() if isinstance(m, ExpertParallelShards)))
    rank = dist.get_rank()
    first_of_writer_group = writer // groups.size * groups.size  # EP groups are consecutive ranks
    example = next(iter(ours.values()))
    for name, shape in ((name, p.shape) for name, p in reference.named_parameters()):
        param, shard = ours.get(name), _expert_shard(name)
        if shard is None or param is not None:  # dense, or one of this rank's shards
            with gathered(param):
                source = first_of_writer_group + (shard // local_shards if shard is not None else 0)
                if shard is not None and rank == source and rank != writer:
                    dist.send(param.data.contiguous(), dst=writer)
                yield name, param.data
        elif rank == writer:
            full = torch.empty(shape, dtype=example.dtype, device=example.device)
            dist.recv(full, src=first_of_writer_group + shard // local_shards)
            yield name, full
        else:
            yield name, example.new_empty(0)
