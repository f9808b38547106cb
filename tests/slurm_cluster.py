"""Helpers for the launch tests: the Slurm dev cluster (schedulers/slurm/devcluster.py) and TorchX runs.

A test module imports the fixture to use it: ``from slurm_cluster import slurm_cluster``.
"""

import functools
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components"
CATALOGUE = COMPONENTS / "components.py"
TORCHXCONFIG = COMPONENTS / ".torchxconfig"
BIN = Path(sys.executable).parent  # the venv's torchx, torchrun, moe-train


def _load_devcluster():
    spec = importlib.util.spec_from_file_location("devcluster", REPO / "schedulers" / "slurm" / "devcluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


devcluster = _load_devcluster()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchx_env(**extra: str) -> dict:
    """The environment for a `torchx` subprocess: the venv first on PATH (Slurm jobs inherit it), the
    shipped .torchxconfig wherever the command runs."""
    path = os.pathsep.join([*extra.pop("PATH_PREPEND", "").split(os.pathsep), str(BIN), os.environ["PATH"]])
    return {**os.environ, "PATH": path.lstrip(os.pathsep), "TORCHXCONFIG": str(TORCHXCONFIG), **extra}


def torchx(*args: str, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "torchx"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def smoke_on_slurm(
    *args: str, work_dir: Path, cwd: Path, env: dict, j: str = "2x1", timeout: float = 600
) -> subprocess.CompletedProcess:
    """``torchx run -s slurm --wait`` of the smoke component on its own rendezvous port; ``args`` are
    further component parameters, then ``--`` and trainer options."""
    return torchx(
        "run",
        "-s",
        "slurm",
        "--wait",
        f"{CATALOGUE}:smoke",
        "-j",
        j,
        "--work_dir",
        str(work_dir),
        "--rdzv_port",
        str(free_port()),
        *args,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """Install (apt-get, once per machine) and start the two-node dev cluster; yield its env.

    Skips only where Slurm cannot be installed (not root, no apt-get), and never under CI=true.
    Stops the cluster afterwards unless it was already running before the session.
    """
    ok, why = devcluster.can_install()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests, but {why}")
        pytest.skip(why)
    was_running = bool(devcluster.running())
    devcluster.up()
    yield devcluster.cluster_env()
    if not was_running:
        devcluster.down()


def slurm_logs(job_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(job_dir.glob("slurm-*")))


@functools.lru_cache(maxsize=None)
def trainer_ready() -> bool:
    """Whether the trainer has landed: `moe-train` is installed and moe_train.engine.train imports."""
    if shutil.which("moe-train") is None and shutil.which("moe-train", path=str(BIN)) is None:
        return False
    try:
        importlib.import_module("moe_train.engine.train")
    except ImportError:
        return False
    return True
