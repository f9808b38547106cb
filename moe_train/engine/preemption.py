"""Stop requests from the scheduler: Slurm preemption/time limit, Kubernetes eviction, scancel.

SIGTERM (and SIGUSR1, which `sbatch --signal=USR1@120` sends ahead of the time limit) only sets
a flag; the loop checks it between steps, every rank agrees on it with one all-reduce, and all
ranks save a checkpoint together before exiting with EXIT_PREEMPTED, so Slurm requeues or TorchX
retries and the next run resumes with --resume auto.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a terminated task


class StopRequested(Exception):
    """Raised after the checkpoint is saved; the CLI turns it into EXIT_PREEMPTED."""


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.at: float | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()

    def agreed(self) -> bool:
        """True on every rank as soon as any rank was signalled (ranks must checkpoint together)."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0])
        if dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0

    def seconds_since(self) -> float:
        return 0.0 if self.at is None else time.monotonic() - self.at
