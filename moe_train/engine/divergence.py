"""Divergence stops the run: a non-finite loss at once, or NONFINITE_STEPS non-finite steps in a row.

A step is non-finite when its global gradient norm is inf/NaN or DeepSpeed skipped it (an overflow:
the optimizer did not move).  One such step happens (fp16 loss-scale calibration, a bad batch);
NONFINITE_STEPS in a row means the weights are gone, and training on would only export a useless
model marked complete.  The figures checked are global (the loss and the norm are all-reduced,
DeepSpeed's skip decision is collective), so every rank stops at the same step without talking.

While a streak of non-finite steps lasts, no periodic checkpoint is saved, so the newest complete
checkpoint is the last good one and ``--resume auto`` restarts from it.
"""

from __future__ import annotations

import math
from typing import Any

NONFINITE_STEPS = 5


class Diverged(ValueError):
    """Training diverged; the CLI shows it as one Error: line and exits non-zero."""


def finite_or_none(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None: metrics stay standard JSON (no Infinity/NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


class DivergenceGuard:
    def __init__(self, skipped_steps: int = 0, limit: int = NONFINITE_STEPS) -> None:
        self.limit = limit
        self.streak = 0
        self._skipped = skipped_steps  # DeepSpeed's running count of skipped steps

    @property
    def healthy(self) -> bool:
        """False while non-finite steps are in a row: this step's state is not worth a checkpoint."""
        return self.streak == 0

    def check(self, step: int, loss: float, grad_norm: Any, skipped_steps: int) -> str | None:
        """Raise Diverged if the run must stop; returns a line to log for a non-finite step."""
        skipped, self._skipped = skipped_steps - self._skipped, skipped_steps
        grad_norm = None if grad_norm is None else float(grad_norm)  # DeepSpeed may hand back a tensor
        if not math.isfinite(loss):
            raise Diverged(
                f"training diverged at step {step}: loss {loss}; lower --lr or check the data, then "
                "resume from the last good checkpoint with --resume auto"
            )
        norm_bad = grad_norm is not None and not math.isfinite(grad_norm)
        if not norm_bad and skipped <= 0:
            self.streak = 0
            return None
        self.streak += 1
        what = f"grad norm {grad_norm}" if norm_bad else "step skipped by DeepSpeed (overflow)"
        if self.streak >= self.limit:
            raise Diverged(
                f"training diverged at step {step}: {what}, {self.streak} non-finite steps in a row; "
                "lower --lr or check the data, then resume from the last good checkpoint with "
                "--resume auto"
            )
        return f"step {step}: {what} ({self.streak} of {self.limit} in a row stop the run)"
