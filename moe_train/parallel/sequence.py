"""Sequence parallelism for MLA (DeepSpeed-Ulysses style), applied to a model from outside.

Shapes: B batch (1 for a packed row), T tokens, H heads, D q/k head dim, V value head dim,
N sequence-parallel size, E routed experts, K experts per token, S samples in the row.

Groups.  The world is cut into groups of N consecutive ranks (consecutive ranks share a node, where
the all-to-all is cheapest).  Every rank of a group reads the same packed row (the loader gets
``dp_rank`` = group index, ``dp_size`` = world / N) and keeps the contiguous slice
``[i*T/N, (i+1)*T/N)`` of it, ``i`` being its place in the group.  Groups are data parallel to each
other; ZeRO-3 still partitions parameters and averages gradients over the whole world.

Attention.  Everything but attention works per token, so it runs on the slice (RoPE gets the true
positions).  Around ``MLAttention.attn_forward`` one all-to-all turns q, k, v from (B, T/N, H, .)
into (B, T, H/N, .), attention runs over the whole row with the row's ``cu_seqlens`` (samples may
cross slice boundaries), and a second all-to-all turns the output back into (B, T/N, H, V).  q, k
and v travel in one buffer, so the different q/k and v head dims cost nothing extra.  The
all-to-all is an autograd function whose backward is the reverse all-to-all, so gradients are exact.

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
  over tokens, so a slice cannot take it alone.  The routing counts (f, no gradient) are summed
  over the group with one small all-reduce per MoE layer; P is a sum over tokens, so each rank
  adds only its slice's share, and the shares add up to the loss of the whole row, gradient
  included.  Each share is multiplied by N because the world average divides by N ranks per row.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_train.data.templates import IGNORE_INDEX
from moe_train.models.deepseek_v2.attention import MLAttention
from moe_train.models.deepseek_v2.moe import MoE


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


def ulysses_attention(attn_forward, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHV: torch.Tensor,
                      cu_seqlens: torch.Tensor | None, max_seqlen: int | None, *, group: dist.ProcessGroup
                      ) -> torch.Tensor:
    """``attn_forward`` over the group's whole row for this rank's heads; takes and returns slices.

    q, k: (B, T/N, H, D), v: (B, T/N, H, V), ``cu_seqlens`` of the whole row; returns (B, T/N, H, V).
    """
    n = dist.get_world_size(group)
    H, D, V = q_BTHD.shape[2], q_BTHD.shape[3], v_BTHV.shape[3]
    qkv = pad_heads(torch.cat([q_BTHD, k_BTHD, v_BTHV], dim=-1), n)  # (B, T/N, Hp, 2D+V)
    qkv = all_to_all(qkv, group, scatter_dim=2, gather_dim=1)  # (B, T, Hp/N, 2D+V)
    q, k, v = qkv.split([D, D, V], dim=-1)
    out = attn_forward(q, k, v, cu_seqlens, max_seqlen)  # (B, T, Hp/N, V)
    return all_to_all(out, group, scatter_dim=1, gather_dim=2)[:, :, :H]  # (B, T/N, H, V)


class SequenceParallel:
    """This rank's sequence-parallel group: splits batches and wraps a model's attention and MoE.

    Create on every rank after the default process group (it creates the groups: a collective).
    """

    def __init__(self, size: int) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if size < 1 or world % size:
            divisors = [d for d in range(1, world + 1) if world % d == 0]
            raise ValueError(f"--sp {size} does not divide the world size {world}; use one of {divisors}")
        self.size = size
        self.group_index, self.group_rank = divmod(rank, size)  # group index = data-parallel rank
        self.num_groups = world // size
        self.group = None
        for g in range(self.num_groups):  # every rank must create every group, in the same order
            group = dist.new_group(list(range(g * size, (g + 1) * size)))
            if g == self.group_index:
                self.group = group
        # The current micro-batch, for the balance loss: the sample of each token of this slice
        # (-1: padding) and the real tokens of each sample of the whole row.
        self._sample_T: torch.Tensor | None = None
        self._tokens_S: torch.Tensor | None = None

    # ---------------------------------------------------------------- model
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap every MLA attention and MoE block of ``model`` (after ``deepspeed.initialize``, so
        these hooks see the outputs DeepSpeed's own hooks hand on)."""
        for module in model.modules():
            if isinstance(module, MLAttention):
                module.attn_forward = functools.partial(ulysses_attention, module.attn_forward, group=self.group)
            elif isinstance(module, MoE):
                self._make_moe_exact(module)
        return model

    def _make_moe_exact(self, moe: MoE) -> None:
        routing: dict[str, torch.Tensor] = {}

        def keep_routing(_gate, _inputs, output):
            routing["scores_TE"], _, routing["index_TK"] = output

        def exact_outputs(module, _inputs, output):
            out, aux, _ = output
            scores_TE, index_TK = routing.pop("scores_TE"), routing.pop("index_TK")
            sample_T, tokens_S = self._samples(scores_TE.device, module.cfg.seq_aux)
            real = sample_T >= 0
            load_E = torch.bincount(index_TK[real].reshape(-1), minlength=module.cfg.n_routed_experts)
            if aux is not None:
                aux = self._balance_loss(module.cfg, scores_TE[real], index_TK[real], sample_T[real], tokens_S)
            return out, aux, load_E

        moe.gate.register_forward_hook(keep_routing)
        moe.register_forward_hook(exact_outputs)

    def _samples(self, device: torch.device, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sample_T is None:
            raise RuntimeError("run SequenceParallel.shard on the batch before the forward")
        self._sample_T, self._tokens_S = self._sample_T.to(device), self._tokens_S.to(device)
        if per_sample:
            return self._sample_T, self._tokens_S
        # seq_aux off: the whole row (without padding) is one sequence
        return torch.where(self._sample_T >= 0, 0, -1), self._tokens_S.sum().reshape(1)

    def _balance_loss(self, cfg, scores_TE: torch.Tensor, index_TK: torch.Tensor, sample_T: torch.Tensor,
                      tokens_S: torch.Tensor) -> torch.Tensor:
        """This rank's share of the row's balance loss, times N (see the module docstring)."""
        E, K, S = cfg.n_routed_experts, cfg.num_experts_per_tok, tokens_S.numel()
        hits_SE = torch.zeros(S, E, device=scores_TE.device)
        hits_SE.index_put_((sample_T[:, None].expand_as(index_TK).reshape(-1), index_TK.reshape(-1)),
                           torch.ones(index_TK.numel(), device=scores_TE.device), accumulate=True)
        dist.all_reduce(hits_SE, group=self.group)
        f_SE = hits_SE * E / (tokens_S[:, None] * K)
        P_share_SE = torch.zeros(S, E, device=scores_TE.device).index_add_(0, sample_T, scores_TE) / tokens_S[:, None]
        return (f_SE * P_share_SE).sum(dim=1).mean() * cfg.aux_loss_alpha * self.size

    # ---------------------------------------------------------------- data
    def shard(self, batch: dict, pad_id: int) -> dict:
        """This rank's slice of a packed micro-batch (see ``shard_row``); call it right before that
        micro-batch's forward: the MoE hooks read the samples of the last batch sharded."""
        part, self._sample_T, self._tokens_S = shard_row(batch, self.group_rank, self.size, pad_id)
        return part

    @staticmethod
    def loss(logits: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy sum of a slice against labels already shifted by ``shard``."""
        return F.cross_entropy(logits.float().flatten(0, -2), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")


def shard_row(batch: dict, rank: int, size: int, pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Slice ``rank`` of ``size`` of a packed micro-batch from ``PackedLoader`` (see the length rule).

    Returns the slice as a batch, with labels already shifted (score it with
    ``SequenceParallel.loss``), ``cu_seqlens``/``max_seqlen`` of the whole padded row and
    ``num_loss_tokens`` of the slice; the sample of each token of the slice (-1: padding); the real
    tokens of each sample of the row.
    """
    ids, pos, cu = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
    if ids.shape[0] != 1:
        raise ValueError(f"sequence parallelism splits one packed row; got a batch of {ids.shape[0]} rows")
    L = ids.shape[1]
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # token t is scored on labels[t+1]
    sample_T = torch.searchsorted(cu[1:], torch.arange(L, dtype=cu.dtype), right=True)
    pad = -L % size
    if pad:
        ids = torch.cat([ids, ids.new_full((1, pad), pad_id)], dim=1)
        labels = torch.cat([labels, labels.new_full((1, pad), IGNORE_INDEX)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)[None]], dim=1)
        sample_T = torch.cat([sample_T, sample_T.new_full((pad,), -1)])
    row_cu = torch.cat([cu, cu.new_tensor([L + pad])]) if pad else cu
    n = (L + pad) // size
    part = slice(rank * n, (rank + 1) * n)
    return {
        "input_ids": ids[:, part],
        "labels": labels[:, part],
        "position_ids": pos[:, part],
        "cu_seqlens": row_cu,
        "max_seqlen": int((row_cu[1:] - row_cu[:-1]).max()),
        "num_loss_tokens": int((labels[:, part] != IGNORE_INDEX).sum()),
    }, sample_T[part], (cu[1:] - cu[:-1]).float()
