"""Packing tokenized samples into sequences of at most ``max_length`` tokens.

Samples are never split across packs.  Packs are filled by best-fit decreasing over the whole
(seed-shuffled) dataset: longest sample first, each into the fullest pack it still fits, which puts
more than 95% of the ``max_length`` budget to use on alpaca-like length mixes.  Inside a pack the
samples keep their input order.  The loader shuffles the packs, so grouping by length here does not
order training.

Each pack records its sample boundaries in ``cu_seqlens`` (int32 offsets ``[0, ..., L]``), the form
that varlen flash attention takes:

* ``varlen=True`` (default): one entry per sample, and ``position_ids`` restart at 0 for each
  sample, so attention and RoPE treat every sample as if it were alone.
* ``varlen=False`` (``--no-varlen``): XTuner's classic packing.  ``cu_seqlens`` is ``[0, L]`` and
  ``position_ids`` run ``0..L-1``, so samples in a pack attend to the ones before them.

In both modes the loss stays within a sample: its first label is always -100, so the last token
of one sample is never trained to predict the first token of the next.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from moe_train.data.templates import IGNORE_INDEX

TOO_LONG = ("truncate", "drop")

Sample = tuple[list[int], list[int]]  # (input_ids, unshifted labels)


@dataclass
class Pack:
    """One packed sequence of L tokens; int32 tensors to halve memory, the loader widens them."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) unshifted, -100 where not trained
    position_ids: torch.Tensor  # (L,)
    cu_seqlens: torch.Tensor  # (n + 1,) sample boundaries; [0, L] when not varlen

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class PackStats:
    """What packing did, for the trainer's log."""

    samples: int  # samples placed in packs
    packs: int
    tokens: int  # tokens in packs
    truncated: int  # samples cut to max_length and kept
    dropped: int  # samples removed: too long under "drop", or no trained token left after truncation
    max_length: int

    @property
    def efficiency(self) -> float:
        """Fraction of the packs' max_length budget holding real (non-padding) tokens."""
        return self.tokens / (self.packs * self.max_length) if self.packs else 0.0

    def __str__(self) -> str:
        return (
            f"{self.samples} samples in {self.packs} packs of <= {self.max_length} tokens "
            f"({self.tokens} tokens, {self.efficiency:.1%} full); "
            f"{self.truncated} truncated, {self.dropped} dropped"
            + (
                " (longer than max_length under too_long=drop, or no trained token left after truncation)"
                if self.dropped
                else ""
            )
        )


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of sample indices; ties in length keep the given order, so the result is deterministic."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def build_pack(samples: list[Sample], varlen: bool) -> Pack:
    """One pack of kept samples (see ``keep``), in the given order."""
    input_ids = torch.tensor([t for ids, _ in samples for t in ids], dtype=torch.int32)
    labels = torch.tensor([t for _, lab in samples for t in lab], dtype=torch.int32)
    lengths = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.int32)
    total = int(lengths.sum())
    cu_seqlens = (
        torch.zeros(len(samples) + 1, dtype=torch.int32) if varlen else torch.tensor([0, total], dtype=torch.int32)
    )
    if varlen:
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return Pack(input_ids, labels, positions(cu_seqlens), cu_seqlens)


def positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at each boundary of ``cu_seqlens``: 0..L-1 for ``[0, L]``."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    total = int(cu_seqlens[-1])
    return torch.arange(total, dtype=torch.int32) - torch.repeat_interleave(cu_seqlens[:-1], lengths)


def keep(sample: Sample, max_length: int, too_long: str) -> tuple[Sample | None, bool]:
    """The sample as packed (cut to ``max_length``, first label -100), or None when it is dropped: too
    long under ``"drop"``, or no trained token left after the cut; and whether it was cut."""
    ids, labels = sample
    if len(ids) != len(labels):
        raise ValueError(f"input_ids and labels differ in length ({len(ids)} vs {len(labels)})")
    cut = len(ids) > max_length
    if cut and too_long == "drop":
        return None, False
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):  # nothing to train, e.g. a cut that left only prompt
        return None, False
    return (ids, [IGNORE_INDEX, *labels[1:]]), cut


def check_options(max_length: int, too_long: str) -> None:
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


def plan_packs(lengths: np.ndarray, max_length: int, seed: int) -> list[list[int]]:
    """The packs as lists of kept-sample indices (ascending: samples keep their input order)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    bins = _best_fit_decreasing(lengths[order], max_length)
    return [sorted(int(order[i]) for i in b) for b in bins]


def pack(
    samples: list[Sample],
    max_length: int,
    varlen: bool = True,
    too_long: str = "truncate",
    seed: int = 0,
) -> tuple[list[Pack], PackStats]:
    """Pack (input_ids, labels) samples into sequences of at most ``max_length`` tokens.

    ``too_long`` decides what happens to a sample longer than ``max_length``: ``"truncate"`` keeps
    its first ``max_length`` tokens, ``"drop"`` removes it.  Deterministic for a given ``seed``.
    """
    check_options(max_length, too_long)
    kept: list[Sample] = []
    truncated = dropped = 0
    for sample in samples:
        s, cut = keep(sample, max_length, too_long)
        if s is None:
            dropped += 1
            continue
        truncated += cut
        kept.append(s)
    lengths = np.array([len(ids) for ids, _ in kept], dtype=np.int64)
    packs = [build_pack([kept[j] for j in b], varlen) for b in plan_packs(lengths, max_length, seed)]
    stats = PackStats(
        samples=len(kept),
        packs=len(packs),
        tokens=int(lengths.sum()),
        truncated=truncated,
        dropped=dropped,
        max_length=max_length,
    )
    return packs, stats
