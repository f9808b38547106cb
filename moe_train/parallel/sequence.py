"""Sequence parallelism for MLA (DeepSpeed-Ulysses style), applied to a model from outside.

Shapes: B batch (1 for a packed row), T tokens, H heads, D q/k head dim, V value head dim,
N sequence-parallel size, E routed experts, K experts per token, S samples in the row.

Groups.  The world is cut into groups of N consecutive ranks (consecutive ranks share a node, where
the all-to-all is cheapest).  Every rank of a group reads the same packed row (the loader gets
``dp_rank`` = group index, ``dp_size`` = world / N) and keeps the contiguous slice
``[i*T/N, (i+1)*T/N)`` of it, ``i`` being its place in the group.  Groups are data parallel to each
other; ZeRO-3 still partitions parameters and averages gradients over the whole world.

Attention.  Everything but attention works per token, so it runs on the slice (RoPE gets the true
positions).  The family's attention modules (``ModelSpec.attention_types``) get their
``inner_attention`` wrapped: one all-to-all turns q, k, v from (B, T/N, H, .) into (B, T, H/N, .),
attention runs over the whole row with the row's ``cu_seqlens`` (samples may cross slice
boundaries), and a second all-to-all turns the output back into (B, T/N, H, V).  When q and k/v
have the same head count (MLA), q, k and v travel in one buffer, so the different q/k and v head
dims cost nothing extra; with fewer k/v heads (GQA) each is exchanged with its own head padding.
The all-to-all is an autograd function whose backward is the reverse all-to-all, so gradients are exact.

Heads rule.  When N does not divide H, the heads are padded with zero heads up to the next multiple
of N before the exchange and dropped after it: group rank j attends heads [j*Hp/N, (j+1)*Hp/N) of
Hp = ceil(H/N)*N.  A zero head's output is zero and receives no gradient; it only costs compute
(e.g. H=4, N=3 attends 6 heads).  DeepSeek V2 (128 heads) and V2-Lite (16) divide by 2, 4 and 8.

Length rule.  A row whose length is not a multiple of N is padded at the end with ``pad_id``
tokens in a sample of their own, labels -100.  The padding is done here rather than by the loader
because the balance loss and the expert-load metric must leave these tokens out to stay exact.

Loss, exactly as with N = 1:
- Labels are shifted before the split (the label of a slice's last token lives on the next rank)
  and each rank takes the cross-entropy sum of its slice; with ``global_tokens`` counting every
  token once, the trainer's ``CE_sum * world * grad_accum / global_tokens`` is unchanged.  Each rank's backward
  sends, through the all-to-all, the gradient of its own loss to the ranks holding the
  activations it used, so the world average DeepSpeed takes is (1/world) * d(sum of all ranks'
  losses): the token-weighted mean over every group, as with N = 1.
- DeepSeek's sequence balance loss, alpha * mean over samples of sum_e f_e * P_e, is not a sum
  over tokens, so a slice cannot take it alone: the MoE blocks get the group as ``balance_group``
  and ``models.common.experts.balance_loss`` sums the routing counts over it (see there).  The
  batch carries each token's sample (``segment_ids``, -1 for padding), so the model needs no state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.models.common.loss import IGNORE_INDEX, shift_labels


def split_for_exchange(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """(n, *x.shape with dim / n): the n pieces of x along dim, piece j for group rank j."""
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of shape {tuple(x.shape)} does not split into {n} equal pieces")
    return torch.stack(x.chunk(n, dim=dim))


def join_after_exchange(pieces: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of the exchange's split: the n received pieces laid end to end along dim."""
    return torch.cat(pieces.unbind(0), dim=dim)


def pad_heads(x_BTHD: torch.Tensor, n: int) -> torch.Tensor:
    """Zero heads appended so that n divides the head count (see the heads rule)."""
    missing = -x_BTHD.shape[2] % n
    return F.pad(x_BTHD, (0, 0, 0, missing)) if missing else x_BTHD


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    send = split_for_exchange(x, dist.get_world_size(group), scatter_dim).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] is the piece group rank j sent us
    return join_after_exchange(recv, gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter ``scatter_dim`` over the group, gather ``gather_dim`` from it; backward is the reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _exchange_heads(x_BTHD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, T/N, H, .) slices -> (B, T, Hp/N, .) heads, zero heads padded up to Hp (heads rule)."""
    return all_to_all(pad_heads(x_BTHD, dist.get_world_size(group)), group, scatter_dim=2, gather_dim=1)


class UlyssesAttention(nn.Module):
    """Wraps an ``inner_attention``: takes and returns this rank's slice, attends over the group's whole row.

    q: (B, T/N, H, D), k: (B, T/N, Hk, D), v: (B, T/N, Hk, V), ``cu_seqlens`` of the whole row;
    returns (B, T/N, H, V).
    """

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(
        self,
        q_BTHD: torch.Tensor,
        k_BTHD: torch.Tensor,
        v_BTHV: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> torch.Tensor:
        H, D, V = q_BTHD.shape[2], q_BTHD.shape[3], v_BTHV.shape[3]
        if k_BTHD.shape[2] == H:  # one buffer, one exchange
            qkv = _exchange_heads(torch.cat([q_BTHD, k_BTHD, v_BTHV], dim=-1), self.group)  # (B, T, Hp/N, 2D+V)
            q, k, v = qkv.split([D, D, V], dim=-1)
        else:  # GQA: q and k/v heads are exchanged separately; each rank's q heads must keep their k/v heads
            n, Hk = dist.get_world_size(self.group), k_BTHD.shape[2]
            if Hk % n or H % Hk:
                raise ValueError(
                    f"sequence parallelism over {n} ranks needs the {Hk} k/v heads to be a multiple of "
                    f"{n} (and to divide the {H} q heads); use --sp among the divisors of {Hk}"
                )
            q = _exchange_heads(q_BTHD, self.group)
            k, v = _exchange_heads(torch.cat([k_BTHD, v_BTHV], dim=-1), self.group).split([D, V], dim=-1)
        out = self.inner(q, k, v, cu_seqlens, max_seqlen)  # (B, T, Hp/N, V)
        return all_to_all(out, self.group, scatter_dim=1, gather_dim=2)[:, :, :H]  # (B, T/N, H, V)


class SequenceParallel:
    """This rank's sequence-parallel group: splits batches and wraps a model's attention and MoE blocks.

    Made by ``ParallelDims.create_groups`` on every rank after the default process group (it creates
    the groups: a collective), from the layout ``dims`` that validated the degree.
    """

    def __init__(self, dims) -> None:
        self.size = dims.sp
        self.group_index, self.group_rank = dims.dp_rank, dims.sp_rank  # group index = data-parallel rank
        self.group = None
        for g in range(dims.dp):  # every rank must create every group, in the same order
            group = dist.new_group(list(range(g * self.size, (g + 1) * self.size)))
            if g == self.group_index:
                self.group = group

    def apply(self, model: nn.Module, spec) -> nn.Module:
        """Wrap the family's attention kernels and give its MoE blocks the group (``spec``: its ModelSpec)."""
        for module in model.modules():
            if isinstance(module, spec.attention_types):
                module.inner_attention = UlyssesAttention(module.inner_attention, self.group)
            elif isinstance(module, spec.moe_types):
                module.balance_group = self.group
        return model

    def shard(self, batch: dict, pad_id: int) -> dict:
        """This rank's slice of a packed micro-batch (see ``shard_row``)."""
        return shard_row(batch, self.group_rank, self.size, pad_id)


def shard_row(batch: dict, rank: int, size: int, pad_id: int) -> dict:
    """Slice ``rank`` of ``size`` of a packed micro-batch from ``PackedLoader`` (see the length rule).

    The slice carries ``targets`` (labels already shifted: the label of its last token lives on the
    next rank), ``segment_ids`` (each token's sample in the whole row, -1: padding),
    ``cu_seqlens``/``max_seqlen`` of the whole padded row and ``num_loss_tokens`` of the slice.
    """
    ids, pos, cu = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
    if ids.shape[0] != 1:
        raise ValueError(f"sequence parallelism splits one packed row; got a batch of {ids.shape[0]} rows")
    L = ids.shape[1]
    targets = shift_labels(batch["labels"])  # token t is scored on labels[t+1]
    sample_T = torch.searchsorted(cu[1:], torch.arange(L, dtype=cu.dtype), right=True)
    pad = -L % size
    if pad:
        ids = torch.cat([ids, ids.new_full((1, pad), pad_id)], dim=1)
        targets = torch.cat([targets, targets.new_full((1, pad), IGNORE_INDEX)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)[None]], dim=1)
        sample_T = torch.cat([sample_T, sample_T.new_full((pad,), -1)])
    row_cu = torch.cat([cu, cu.new_tensor([L + pad])]) if pad else cu
    n = (L + pad) // size
    part = slice(rank * n, (rank + 1) * n)
    return {
        "input_ids": ids[:, part],
        "targets": targets[:, part],
        "position_ids": pos[:, part],
        "segment_ids": sample_T[part].long(),
        "cu_seqlens": row_cu,
        "max_seqlen": int((row_cu[1:] - row_cu[:-1]).max()),
        "num_loss_tokens": int((targets[:, part] != IGNORE_INDEX).sum()),
    }
