"""Stop requests from the scheduler: Slurm preemption/time limit, Kubernetes eviction, scancel.

SIGTERM (and SIGUSR1, which `sbatch --signal=USR1@120` sends ahead of the time limit, and SIGINT,
Ctrl-C) only sets a flag; the loop checks it between steps, every rank agrees on it with one all-reduce, and all
ranks save a checkpoint together before exiting with EXIT_PREEMPTED, so Slurm requeues or TorchX
retries and the next run resumes with --resume auto.

Grace period (``--preempt-grace``).  A scheduler allows a fixed time between the stop signal and
SIGKILL: Slurm's KillWait (30 s by default) or the partition's GraceTime on preemption,
Kubernetes' terminationGracePeriodSeconds (30 s), torchrun's --shutdown-timeout (30 s) for its
workers.  The step in flight and the checkpoint must fit in it.  When the grace runs out before
the checkpoint is saved, rank 0 says so at once (the line a SIGKILLed job leaves behind); a save
that finishes late says how late.  Either way nothing breaks: a checkpoint cut short is never
marked COMPLETE, and the next run resumes from the previous one.

A second stop signal ends the process at once, with EXIT_PREEMPTED and without a checkpoint: the
sender insists.  It must be the same signal, and come REPEAT_S or more after the first: within
that window it is the first request delivered twice (Slurm signals every process of a job step,
and torchrun also forwards its own copy to its workers), and a SIGTERM after a SIGUSR1 is Slurm
reaching the time limit it warned about, which still leaves KillWait for the save.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C saves too
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a terminated task
DEFAULT_GRACE_S = 30.0  # Slurm KillWait, Kubernetes terminationGracePeriodSeconds and torchrun's default
REPEAT_S = 2.0


class StopRequested(Exception):
    """Raised after the checkpoint is saved; the CLI turns it into EXIT_PREEMPTED."""


def _say(msg: str) -> None:
    """One line on stderr from rank 0.  A raw write: print() from a signal handler raises when the
    handler interrupted a write to the same stream (the progress bar writes to stderr all the time)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.write(2, f"[moe-train] {msg}\n".encode())


_EARLY: list[int] = []  # SIGUSR1 received during start-up, before the loop's StopFlag


def catch_early_warning() -> None:
    """From process start: remember SIGUSR1 (``sbatch --signal=USR1@120``, Slurm's advance warning of the time
    limit), whose default action would kill the rank during a start-up that can take minutes on a large model;
    the loop then saves after its first step.  SIGTERM and SIGINT keep their default until the loop."""
    signal.signal(signal.SIGUSR1, lambda signum, _frame: _EARLY.append(signum))


class StopFlag:
    """Installed around the training loop: turns stop signals into a flag the ranks agree on."""

    def __init__(self, grace: float = DEFAULT_GRACE_S) -> None:
        if grace <= 0:
            raise ValueError(f"--preempt-grace {grace}: must be a positive number of seconds")
        self.grace = grace
        self.signum: int | None = None
        self.at: float | None = None
        self._timer: threading.Timer | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        if _EARLY:
            self._handle(_EARLY.pop(), None)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            _say(f"{name}: saving a checkpoint after the current step, within the {self.grace:g}s grace")
            self._timer = threading.Timer(
                self.grace,
                _say,
                [
                    f"the {self.grace:g}s grace after {name} is over and the checkpoint is not saved yet; if the "
                    "scheduler kills the job now, the next run resumes from the previous complete checkpoint"
                ],
            )
            self._timer.daemon = True
            self._timer.start()
        elif signum == self.signum and self.seconds_since() >= REPEAT_S:
            _say(f"second {name}: exiting now without a checkpoint")
            os._exit(EXIT_PREEMPTED)

    def agreed(self) -> bool:
        """True on every rank as soon as any rank was signalled (ranks must checkpoint together)."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0])
        if dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0

    def seconds_since(self) -> float:
        return 0.0 if self.at is None else time.monotonic() - self.at

    def requested(self, step: int) -> StopRequested:
        """The exception to raise once the stop checkpoint of `step` is saved."""
        if self._timer is not None:
            self._timer.cancel()
        took = self.seconds_since()
        if self.at is None:  # another rank was signalled
            timing = "checkpoint saved"
        elif took > self.grace:
            timing = (
                f"checkpoint saved {took:.1f}s after the signal, later than the {self.grace:g}s grace: "
                "give the job a longer grace (Slurm KillWait/GraceTime or --signal=USR1@SECONDS, "
                "Kubernetes terminationGracePeriodSeconds, torchrun --shutdown-timeout) and --preempt-grace"
            )
        else:
            timing = f"checkpoint saved {took:.1f}s after the signal, within the {self.grace:g}s grace"
        return StopRequested(f"stop requested at step {step}: {timing}; resume with --resume auto")
