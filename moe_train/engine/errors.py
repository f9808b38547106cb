"""How a failure reaches the user: one ``Error:`` line, said once, whatever launched the ranks.

A rank that fails records its line in torch's elastic error file (``TORCHELASTIC_ERROR_FILE``, set by
torchrun's agent and by TorchX for each replica), with the call stack beside it.  Then:

- Under the project's own launchers (``moe-train train`` in the env form and ``moe-train-torchrun``,
  which set :data:`LAUNCHER_ENV` for their ranks) the rank prints nothing; when torchrun's agent reports
  the failed ranks, the launcher reads their error files and prints one line naming the root-cause rank
  (:func:`launcher_line`) as the last thing the user sees.  No traceback is printed anywhere (``--debug``
  prints the rank's own).
- Under plain torchrun or srun, whose reports we cannot remove, the rank prints its line itself, and
  ranks that fail with the same line say it once: the first to fail claims it on the job's store
  (:func:`_claim`); a rank failing with another line prints its own, naming itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from moe_train.storage import redact_all

LAUNCHER_ENV = "MOE_TRAIN_LAUNCHER"  # set by our launchers for their ranks: the launcher says the line
STOPPED = "stopped"  # the category of a stop on a signal (checkpoint saved): not an error
_CLAIM_KEY = "moe-train/error-line"
_CLAIM_WAIT_S = 5.0  # the store may be gone with rank 0; better said twice than never
_DEFER_S = 1.0  # how long ranks other than 0 let rank 0 speak first


def rank_from_env() -> int:
    """This process's rank as its launcher set it (0 when none did)."""
    for name in ("RANK", "SLURM_PROCID"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def under_our_launcher() -> bool:
    return os.environ.get(LAUNCHER_ENV) == "1"


def write_error_file(message: str, category: str, callstack: str = "") -> None:
    """Record this rank's failure where torchrun's agent (and TorchX) look for it; no file, no-op."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": message,
            "extraInfo": {
                # what torchrun's root-cause report prints: the stack of a bug, else the one line
                "py_callstack": callstack if category == "bug" else message,
                "timestamp": str(int(time.time())),
                "moe_train": category,  # "expected" (bad input, full disk, ...), "bug" or "stopped"
                "call_stack": callstack,
            },
        }
    }
    # The agent reads the file as soon as it sees this process exit, or while another rank's failure
    # has it polling: write it whole under another name and rename, so it never reads a partial file.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(redact_all(data), f)  # a bug's message and stack may hold a URL with its credentials
        os.replace(tmp, path)
    except OSError:
        pass


def _claim(line: str, rank: int) -> bool:
    """True when this rank should print ``line``: no other rank of the job has said the same line."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    if rank != 0:
        # Rank 0 owns the progress bar and usually fails with the same line: let it close the bar and
        # say the line first, so it does not land mid-bar (the agent stops us all soon after anyway).
        time.sleep(_DEFER_S)
    result: list[Any] = []

    def ask() -> None:
        try:
            store = dist.distributed_c10d._get_default_store()
            result.append(store.compare_set(_CLAIM_KEY, "", f"{rank}\n{line}"))
        except Exception:  # the store went away with its host
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(_CLAIM_WAIT_S)
    if not result:
        return True
    holder, _, said = bytes(result[0]).decode(errors="replace").partition("\n")
    return holder == str(rank) or said != line


def report(line: str | None, exc: BaseException, debug: bool) -> None:
    """Say a failed run's line (``None``: a bug, whose traceback the caller re-raises under plain launchers)."""
    callstack = "".join(traceback.format_exception(exc))
    write_error_file(line or f"{type(exc).__name__}: {exc}", "bug" if line is None else "expected", callstack)
    if debug:
        sys.stderr.write(callstack)
    if line is None or under_our_launcher():
        return
    rank = rank_from_env()
    if _claim(line, rank):
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        sys.stderr.write(f"Error: {f'rank {rank}: ' if world > 1 and rank else ''}{line}\n")
        sys.stderr.flush()


def report_stop(line: str) -> None:
    """A run stopped on a signal after saving its checkpoint: a note, said by rank 0 under every launcher."""
    write_error_file(line, STOPPED)
    if rank_from_env() == 0:
        sys.stderr.write(f"moe-train: {line}\n")
        sys.stderr.flush()


@dataclass(frozen=True)
class Failure:
    rank: int
    exitcode: int
    message: str
    category: str  # expected, bug, stopped, or "" (no error file: killed, crashed in C)
    error_file: str
    timestamp: int


def failures_of(child_failed: Any) -> list[Failure]:
    """The failed ranks of torch's ``ChildFailedError``, from their error files."""
    out = []
    for rank, f in child_failed.failures.items():
        message, category = f.message, ""
        if isinstance(message, dict):
            category = message.get("extraInfo", {}).get("moe_train", "")
            message = message.get("message", "")
        elif isinstance(f.error_file_data, dict):
            info = f.error_file_data.get("message", {})
            category = info.get("extraInfo", {}).get("moe_train", "") if isinstance(info, dict) else ""
        out.append(Failure(rank, f.exitcode, str(message), category, f.error_file, f.timestamp))
    return out


def launcher_line(failures: list[Failure], debug: bool = False) -> tuple[str, int]:
    """The one line a launcher prints for its failed ranks, and its exit code.

    The root cause is the first rank that failed for a reason we know (bad input, full disk, a stop
    signal), else the first that failed at all; the ranks torchrun stopped because of it are not named."""
    order = {"expected": 0, STOPPED: 1, "bug": 2, "": 3}
    root = min(failures, key=lambda f: (order.get(f.category, 3), f.timestamp, f.rank))
    who = f"rank {root.rank}" if len(failures) > 1 or root.rank else "rank 0"
    code = root.exitcode if root.exitcode > 0 else 128 - root.exitcode if root.exitcode < 0 else 1
    if root.category == STOPPED:
        return f"moe-train: {root.message}", code
    if root.category == "expected":
        return f"Error: {who}: {root.message}", code
    if root.category == "bug":
        where = f"; its call stack is in {root.error_file}" if root.error_file and root.error_file != "<N/A>" else ""
        return (
            f"Error: {who} failed: {root.message.splitlines()[0] if root.message else 'unknown error'} "
            f"(a bug in moe-train{where}; --debug prints it)",
            code,
        )
    if root.exitcode < 0:
        try:
            name = signal.Signals(-root.exitcode).name
        except ValueError:
            name = f"signal {-root.exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"Error: {who} was killed by {name}{hint}; its output above says what it was doing", code
    return f"Error: {who} exited with code {root.exitcode} without a message; its output above says why", code
