"""The trainer's log lines: one line from rank 0, above the progress bar, credentials redacted."""

from __future__ import annotations

import sys

from moe_train.storage import redact


def log(rank: int, msg: str) -> None:
    """One line from rank 0 (every rank would say the same), above the progress bar if there is one."""
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"[moe-train] {redact(msg)}", file=sys.stdout)
        sys.stdout.flush()
