"""Run `moe-train train` for real: 2 processes under torchrun on gloo (CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        # A killed JIT build leaves a lock that hangs the next run: one extensions dir per run.
        TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def torchrun_cmd(args: list[str], nproc: int = 2, torchrun_args: list[str] | None = None) -> list[str]:
    """The command line of ``moe-train train ARGS`` under torchrun on this machine, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        f"--master_port={free_port()}",
        *(torchrun_args or []),
        "-m",
        "moe_train.cli",
        "train",
        *args,
        "--launcher",
        "pytorch",
    ]


def torchrun(
    args: list[str],
    tmp: Path,
    nproc: int = 2,
    timeout: int = 300,
    env: dict | None = None,
    torchrun_args: list[str] | None = None,
) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(args, nproc, torchrun_args)
    return subprocess.run(cmd, env=env or cpu_env(tmp), capture_output=True, text=True, timeout=timeout)


def moe_train(args: list[str], tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """One process, --launcher none (for the bad-input cases)."""
    return subprocess.run(
        [sys.executable, "-m", "moe_train.cli", *args],
        env=cpu_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(work_dir: Path) -> dict:
    return json.loads((work_dir / "summary.json").read_text())


def metrics(work_dir: Path) -> list[dict]:
    """The run's records across its segments, each step once (the trainer's own reader)."""
    from moe_train.engine.metrics import read_metrics
    from moe_train.run_dir import RunDir

    return read_metrics(RunDir(str(work_dir)))


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
    return proc
