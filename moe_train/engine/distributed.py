"""Process groups for the three launchers, set up so DeepSpeed runs the same way under each.

- ``pytorch``: torchrun started us; RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set.
- ``slurm``: plain ``srun``, one task per GPU, no torchrun. Ranks come from SLURM_PROCID /
  SLURM_NTASKS / SLURM_LOCALID; the master is the first host of the step's node list, the port
  is derived from the job id. MASTER_ADDR / MASTER_PORT in the environment win over both.
- ``none``: one process, a world of 1 on an in-memory store, so no port is needed.

The backend is nccl when CUDA is available, else gloo. On CPU, DeepSpeed would JIT-compile a
shared-memory all-reduce op at start-up (about 30 s on two cores) that only its tensor-parallel
inference uses; it is switched off, so a CPU run compiles nothing unless an optimizer op (CPU Adam
for ZeRO-Offload) asks for it. Such a build goes to a directory private to this run, because a
killed build leaves a lock behind that hangs every later build in the same directory.

No orphans.  A rank must not outlive its launcher: an orphan keeps training, saving and exporting
into the work dir next to the job that replaces it.  Under torchrun the kernel SIGKILLs a rank
when the agent dies (``prctl(PR_SET_PDEATHSIG)``); for every launcher a watchdog thread also checks
once a second that the parent is still the one the rank started with (srun's step daemon, or a
launcher that does not own the rank's process group) and ends the rank when it is not.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

LAUNCHERS = ("none", "pytorch", "slurm")
# Saving or exporting a 236B checkpoint keeps ranks at a barrier for a long time; torch's default
# NCCL timeout (10 min) would kill the job there.
DEFAULT_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None  # None for --launcher none
    master_port: int | None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "cpu:gloo,cuda:nccl" or "gloo"
    device: torch.device


def _missing(environ: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not environ.get(n)]


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _are(names: list[str]) -> str:
    return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not set"


def launch_env(launcher: str, environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read rank, world size and rendezvous address for ``launcher`` from ``environ``."""
    if launcher == "none":
        if environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise ValueError(
                f"--launcher none but WORLD_SIZE={environ['WORLD_SIZE']} (started by torchrun?); use --launcher pytorch"
            )
        return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None)
    if launcher == "pytorch":
        missing = _missing(environ, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
        if missing:
            raise ValueError(
                f"--launcher pytorch but {_are(missing)}; run under torchrun, set NPROC_PER_NODE (this command then "
                "starts torchrun itself), or use --launcher none"
            )
        env = LaunchEnv(
            rank=_int(environ, "RANK"),
            world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK"),
            master_addr=environ["MASTER_ADDR"],
            master_port=_int(environ, "MASTER_PORT"),
        )
    elif launcher == "slurm":
        missing = _missing(environ, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        if missing:
            raise ValueError(
                f"--launcher slurm but {_are(missing)}; run under srun (one task per GPU) "
                "or use --launcher pytorch under torchrun"
            )
        env = LaunchEnv(
            rank=_int(environ, "SLURM_PROCID"),
            world_size=_int(environ, "SLURM_NTASKS"),
            local_rank=_int(environ, "SLURM_LOCALID"),
            master_addr=_slurm_master_addr(environ),
            master_port=_slurm_master_port(environ),
        )
    else:
        raise ValueError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is outside a world of {env.world_size} processes")
    return env


def _slurm_master_addr(environ: Mapping[str, str]) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    # The step's node list first: with srun's default block distribution, rank 0 runs on its first node.
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            return first_host(environ[name])
    raise ValueError("--launcher slurm but no SLURM_JOB_NODELIST/SLURM_NODELIST; set MASTER_ADDR")


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    if environ.get("MASTER_PORT"):
        return _int(environ, "MASTER_PORT")
    if not environ.get("SLURM_JOB_ID"):
        raise ValueError("--launcher slurm but neither MASTER_PORT nor SLURM_JOB_ID is set")
    # Same on every task of the job, differs between jobs sharing a node, and stays in
    # 10000-29999, below Linux's ephemeral range (32768+) where outgoing connections take ports.
    return 10000 + _int(environ, "SLURM_JOB_ID") % 20000


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``scontrol show hostnames`` if present, else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Several bracket groups in one name expand as a product (``r[1-2]n[1-2]``); a range keeps the
    zero padding of its lower bound.
    """
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        expansions = [""]
        pos = 0
        for group in _GROUP.finditer(pattern):
            prefix = pattern[pos : group.start()]
            expansions = [e + prefix + n for e in expansions for n in _expand_ranges(group.group(1), nodelist)]
            pos = group.end()
        rest = pattern[pos:]
        if not pattern or "[" in rest or "]" in rest:
            raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
        hosts += [e + rest for e in expansions]
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"cannot parse Slurm node list {nodelist!r}: unbalanced brackets")
    if depth:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}: unbalanced brackets")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts]


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    names: list[str] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"cannot parse Slurm node list {nodelist!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        names += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return names


def _private_extensions_dir(launcher: str) -> None:
    """Point torch's JIT builds at a directory shared by this run's local ranks and no other run."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    if launcher == "slurm":
        key = f"slurm{os.environ.get('SLURM_JOB_ID', '')}.{os.environ.get('SLURM_STEP_ID', '')}"
    elif launcher == "pytorch":
        key = f"torchrun{os.getppid()}"  # the local ranks' common parent is the torchrun agent
    else:
        key = f"pid{os.getpid()}"
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(tempfile.gettempdir(), f"moe_train_torch_extensions_{key}")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_POLL_S = 1.0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(poll_s: float = ORPHAN_POLL_S) -> threading.Thread:
    """A daemon thread that ends this process (SIGKILL) once it is re-parented: its launcher is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.write(
            2,
            f"[moe-train] rank {os.environ.get('RANK', '?')}: launcher (pid {parent}) is gone; "
            "exiting so no orphan writes into the work dir\n".encode(),
        )
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="moe-train-orphan-watch", daemon=True)
    thread.start()
    return thread


def die_with_launcher(launcher: str) -> None:
    """No orphans (see the module docstring); nothing to do for a single process (--launcher none)."""
    if launcher == "none":
        return
    if launcher == "pytorch":  # torchrun's agent starts the ranks from its main thread, as PDEATHSIG needs
        set_parent_death_signal()
    watch_parent()


def init_distributed(launcher: str, timeout: timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Create the default process group for ``launcher`` and hand it to DeepSpeed.

    Exports RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) so DeepSpeed reads the same
    values; pass ``dist_init_required=False`` to ``deepspeed.initialize`` afterwards.
    """
    env = launch_env(launcher)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call init_distributed once per process")
    die_with_launcher(launcher)
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if env.master_addr is not None:
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    _private_extensions_dir(launcher)

    cuda = torch.cuda.is_available()
    # gloo for host tensors (step counters, stop flag), nccl for the model's collectives.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    kwargs = {}
    if cuda:
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if launcher == "none":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun hosts one store for all restart rounds, and the process group's keys carry no
        # round: after `--max-restarts` a new rank can read a dead rank's gloo/nccl address and
        # fail with "Connection refused".  Keying our group by the round closes that.
        store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"moe-train/round-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(
            backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )
    else:
        dist.init_process_group(
            backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )

    import deepspeed
    import deepspeed.ops

    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module docstring
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return DistInfo(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, backend=backend, device=device)


def destroy_distributed() -> None:
    """Wait for every rank, then tear the process groups down; call at the end of every run."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def hard_exit(code: int = 0) -> NoReturn:
    """Flush output and end the process without Python's interpreter shutdown.

    On gloo, a worker thread of the last collective can still be dropping its tensors when Python
    shuts down; it then needs the GIL, is killed, and the process aborts ("terminate called
    without an active exception", SIGABRT) after all the work is done, so torchrun reports a
    failure. A barrier narrows the window but does not close it on a loaded machine; skipping
    the shutdown does. Call after ``destroy_distributed`` with everything written and closed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
