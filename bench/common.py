"""Timing and reporting shared by the benchmarks.

The CPU machines these run on are shared, so a single timing says little.  Every comparison runs
its variants round-robin (A B C A B C ...) in one process and reports the median of each, so a
burst of load from elsewhere hits all variants alike instead of one.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager


def interleaved_medians(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, max_repeats: dict[str, int] | None = None
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each case, as {"wall": {case: s}, "cpu": {case: s}}.

    Cases run round-robin after `warmup` untimed rounds, in reverse order every other round so
    none always follows the same neighbour.  ``cpu`` is this process's CPU time: with one thread
    it is the work done, without the time other jobs held the core, hence much steadier than
    wall time on a shared machine (with more threads it also counts their spin-waits).
    ``max_repeats`` caps the timed calls of slow cases (their median then rests on fewer runs).
    """
    caps = max_repeats or {}
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for round_ in range(warmup + repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            if round_ >= warmup and len(wall[name]) >= caps.get(name, repeats):
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            cases[name]()
            if round_ >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {
        "wall": {n: statistics.median(t) for n, t in wall.items()},
        "cpu": {n: statistics.median(t) for n, t in cpu.items()},
    }


def machine() -> str:
    """CPU model and core count (lscpu when present), plus the torch threads used."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table (what RESULTS.md holds)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Result:
    """What one benchmark hands back: its headline figures, their targets, and a table for humans.

    ``targets`` maps a figure to (">=" or "<=", bound).
    """

    def __init__(
        self,
        title: str,
        figures: dict[str, float],
        table: str,
        notes: str = "",
        targets: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.title, self.figures, self.table, self.notes = title, figures, table, notes
        self.targets = targets or {}

    def verdicts(self) -> list[str]:
        lines = []
        for name, value in self.figures.items():
            if name in self.targets:
                op, bound = self.targets[name]
                met = value >= bound if op == ">=" else value <= bound
                lines.append(f"{name} = {value:.3g} (target {op} {bound:g}: {'met' if met else 'NOT met'})")
            else:
                lines.append(f"{name} = {value:.3g}")
        return lines

    def __str__(self) -> str:
        parts = [f"## {self.title}", self.table, self.notes, "\n".join(f"- {v}" for v in self.verdicts())]
        return "\n\n".join(p for p in parts if p) + "\n"


_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_s3():
    """A real S3-protocol server (moto) on a free loopback port, in a child process; yields storage
    options.  The benchmarks and the tests (tests/conftest.py) share it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(_S3_ENV)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)
        yield {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_ranks_env(tmp: str) -> dict[str, str]:
    """The environment of benchmark ranks on CPU: gloo, one thread each, this checkout importable, and a
    private extensions dir (a killed JIT build leaves a lock that hangs the next one)."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=os.path.join(tmp, "torch_extensions"),
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def torchrun_module(module: str, nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` of ``python -m module`` on ``nproc`` local ranks, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        f"--master_port={free_port()}",
        "-m",
        module,
    ]
