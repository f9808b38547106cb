"""Deterministic, resumable, distributed iteration over packed sequences.

Each step gives this rank one micro-batch of ``micro_batch_size`` packs laid end to end as a single
row (varlen attention keeps them apart through ``cu_seqlens``)::

    input_ids        (1, L) long
    labels           (1, L) long, unshifted, -100 where not trained
    position_ids     (1, L) long
    cu_seqlens       (n + 1,) int32, sample boundaries [0, ..., L]
    max_seqlen       int, the longest segment in cu_seqlens (flash-attn wants it on the host)
    num_loss_tokens  int, labels[1:] != -100: the tokens that count after the HF shift
    num_packs        int, packs in this micro-batch; 0 for a dummy (see below)

Epoch ``e`` visits the packs in a permutation seeded by ``(seed, e)``.  Micro-batch ``s`` of rank
``r`` takes positions ``(s * dp_size + r) * micro_batch_size ...`` of it, so ranks never share a
pack.  Every pack is trained exactly once per epoch: an epoch has
``ceil(len(packs) / (dp_size * micro_batch_size * grad_accum))`` optimiser steps, and the last one
takes the leftover packs.  ZeRO-3 needs every rank to run the same number of forwards, so every
rank yields ``steps_per_epoch * grad_accum`` micro-batches per epoch; where the packs have run out
it yields a dummy micro-batch: one pad token, labels -100,
``num_packs`` 0.  It trains no token, and the trainer zeroes its balance loss and expert load, so the
token-weighted loss of that step is exactly the loss of its real packs.  Ranks that must see the
same sample, such as a sequence-parallel group, pass the same ``dp_rank`` (their group's index) and
``dp_size`` (the number of groups).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from moe_train.data.packing import Pack
from moe_train.data.sources import DataError
from moe_train.data.templates import IGNORE_INDEX


class PackedLoader:
    """Micro-batches of packs for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        packs: list[Pack],
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        micro_batch_size: int = 1,
        pad_id: int = 0,
        grad_accum: int = 1,
    ):
        """``pad_id`` fills the dummy micro-batches (sequence parallelism pads its own slices)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError("micro_batch_size and grad_accum must be at least 1")
        if not packs:
            raise DataError("no packs to train on; add data")
        self.packs = packs
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.grad_accum = grad_accum
        per_step = dp_size * micro_batch_size * grad_accum  # packs one optimiser step takes
        self.steps_per_epoch = -(-len(packs) // per_step)
        self.micro_batches_per_epoch = self.steps_per_epoch * grad_accum
        self.dummies_per_epoch = self.steps_per_epoch * per_step - len(packs)  # empty pack slots, all ranks
        self.epoch, self.step = 0, 0  # the next micro-batch this rank will yield

    def __len__(self) -> int:
        """Micro-batches this rank yields per epoch (the same on every rank)."""
        return self.micro_batches_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.packs))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.packs))

    def _batch(self, packs: list[Pack]) -> dict[str, Any]:
        if not packs:
            return self._dummy()
        input_ids = torch.cat([p.input_ids for p in packs]).long()
        labels = torch.cat([p.labels for p in packs]).long()
        position_ids = torch.cat([p.position_ids for p in packs]).long()
        offsets, bounds = 0, [torch.zeros(1, dtype=torch.int32)]
        for p in packs:
            bounds.append(p.cu_seqlens[1:] + offsets)
            offsets += len(p)
        cu_seqlens = torch.cat(bounds)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            "num_loss_tokens": int((labels[1:] != IGNORE_INDEX).sum()),
            "num_packs": len(packs),
        }

    def _dummy(self) -> dict[str, Any]:
        return {
            "input_ids": torch.full((1, 1), self.pad_id, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((1, 1), dtype=torch.long),
            "cu_seqlens": torch.tensor([0, 1], dtype=torch.int32),
            "max_seqlen": 1,
            "num_loss_tokens": 0,
            "num_packs": 0,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining micro-batches of the current epoch; afterwards ``epoch`` has moved on by one.

        The position advances as each batch is handed out, so ``state_dict()`` taken after a batch
        resumes with the next one.
        """
        epoch, order, k = self.epoch, self._order(self.epoch), self.micro_batch_size
        last = self.micro_batches_per_epoch
        for s in range(self.step, last):
            first = (s * self.dp_size + self.dp_rank) * k
            batch = self._batch([self.packs[i] for i in order[first : first + k]])  # [] past the end: a dummy
            self.epoch, self.step = (epoch + 1, 0) if s + 1 == last else (epoch, s + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "num_packs": len(self.packs),
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "grad_accum": self.grad_accum,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("num_packs", "dp_size", "micro_batch_size", "seed", "shuffle", "grad_accum"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(
                    f"the data loader was saved with {key}={state[key]} but now has {mine[key]}; resume with "
                    f"the same data, max_length, seed, data-parallel size, micro batch size and grad_accum"
                )
        self.epoch, self.step = state["epoch"], state["step"]
