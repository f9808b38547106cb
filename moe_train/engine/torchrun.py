"""The project's launchers: ``moe-train-torchrun ARGS`` and the seed's env form of ``moe-train train``.

Both are torchrun's own ``run`` in this process, so signals (Slurm's SIGTERM, Kubernetes' stop) reach
torchrun's handlers as under plain ``torchrun``, and elastic restarts work the same.  They differ from
plain torchrun in two ways:

**Errors end on one line.**  The ranks record their failure in torch's elastic error files and print
nothing (``moe_train/engine/errors.py``); when torchrun reports failed ranks, the launcher prints one
``Error: rank R: ...`` line naming the root cause and the fix, and no traceback (torchrun's own
``ChildFailedError`` report is not printed).  A failed rendezvous is one line too.

**The rendezvous store outlives every node's agent.**  With ``--rdzv-backend c10d`` the agent that
hosts the store (``--rdzv-conf is_host=1``) keeps it in its own process.  At the end of a job every
agent waits at torchrun's exit barrier, then closes the rendezvous on that store; the host, done
first, exits and takes the store with it while another node's agent is still closing, which prints a
C++ ``TCPStore recvVector failed`` trace after a run that succeeded.  No sleep closes that race
(everyone leaves the barrier together), so on the host node this process serves the store itself and
hands torchrun ``is_host=0``; every agent of the job counts itself in on the store before torchrun
starts and out when torchrun has returned, and the store stays up until the counts agree (or
:data:`EXIT_WAIT_S` has passed: an agent lost mid-job never counts out).  Without c10d, an explicit
``is_host`` or more than one node, the store is torchrun's as usual.

**The env form** (XTuner's): ``NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 ADDR=node0 PORT=29600 moe-train
train RECIPE --launcher pytorch`` on each node starts torchrun itself (:func:`env_form_args`): a c10d
rendezvous at ADDR:PORT hosted by node 0.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta

from moe_train.engine.errors import LAUNCHER_ENV, failures_of, launcher_line, write_error_file

EXIT_WAIT_S = 30.0  # longest the store host waits for the other agents after its own has finished
_DEFAULT_PORT = 29400  # torchrun's for c10d
STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # SIGUSR1: `sbatch --signal=USR1@120`, forwarded to the ranks


class _DropFailedRankLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed (exitcode" not in record.getMessage()


_DROP_FAILED_RANK_LINE = _DropFailedRankLine()


def _rdzv_conf(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)


def env_form_args(environ: Mapping[str, str], cli_args: list[str]) -> list[str]:
    """torchrun's arguments for ``moe-train CLI_ARGS`` started in the env form (see the module docstring)."""

    def number(name: str, default: str | None, low: int) -> int:
        raw = environ.get(name, default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = low - 1
        if value < low:
            raise ValueError(f"{name}={raw!r} must be an integer >= {low}")
        return value

    nproc = number("NPROC_PER_NODE", None, 1)
    nnodes = number("NNODES", "1", 1)
    node_rank = number("NODE_RANK", "0", 0)
    if node_rank >= nnodes:
        raise ValueError(f"NODE_RANK={node_rank} is not below NNODES={nnodes}; number the nodes 0..{nnodes - 1}")
    port = number("PORT", "0", 0)
    if nnodes > 1 and not (environ.get("ADDR") and port):
        raise ValueError(
            f"NNODES={nnodes} needs ADDR (node 0's address) and PORT (a free port there) set to the same values "
            "on every node, e.g. ADDR=$NODE_0_ADDR PORT=29600"
        )
    addr = environ.get("ADDR") or "127.0.0.1"
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={addr}:{port}",
        f"--rdzv-conf=is_host={int(node_rank == 0)}",
        f"--signals-to-handle={STOP_SIGNALS}",
        "-m",
        "moe_train.cli",
        *cli_args,
    ]


def _attempt(args, debug: bool, rendezvous_fix: str | None) -> tuple[str | None, int]:
    """torchrun's ``run(args)``: the line to say (None: nothing) and the exit code."""
    import torch.distributed.elastic.rendezvous as rendezvous
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torch_run.run(args)
        return None, 0
    except ChildFailedError as e:
        line, code = launcher_line(failures_of(e), debug)
        return (None if line.startswith("moe-train:") else line), code  # a stop, checkpoint saved: rank 0 said so
    except SignalException as e:  # torchrun passed the signal on to the ranks, which saved and stopped
        return None, 128 + int(e.sigval)
    except (rendezvous.RendezvousError, TimeoutError, ConnectionError, RuntimeError, ValueError) as e:
        return _rendezvous_line(args, e, debug, rendezvous_fix), 1


def _rendezvous_line(args, e: Exception, debug: bool, fix: str | None) -> str:
    if debug:
        import traceback

        traceback.print_exc()
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    fix = fix or (
        f"start every node with the same --nnodes, --rdzv-id and --rdzv-endpoint ({args.rdzv_endpoint}), "
        "reachable from all of them"
    )
    return f"Error: the rendezvous at {args.rdzv_endpoint} failed ({type(e).__name__}: {first}); {fix}"


def _say(line: str | None) -> None:
    """Print ``line`` as this node's last (each node's launcher speaks for its own ranks: on a cluster every
    node has its own log)."""
    if line is None:
        return
    write_error_file(line.removeprefix("Error: "), "expected")  # TorchX shows it as the replica's error
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _run_keeping_the_store(args, debug: bool, rendezvous_fix: str | None) -> int:
    """torchrun; for a multi-node c10d job naming ``is_host``, with the store kept up here (module docstring)."""
    import torch.distributed as dist
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    conf = _rdzv_conf(args.rdzv_conf)
    _, max_nodes = torch_run.parse_min_max_nnodes(args.nnodes)
    if args.standalone or args.rdzv_backend != "c10d" or "is_host" not in conf or max_nodes == 1:
        if args.rdzv_id == "none":  # one launch, one job id (the lease tells jobs apart by it)
            args.rdzv_id = uuid.uuid4().hex
        line, code = _attempt(args, debug, rendezvous_fix)
        _say(line)
        return code

    is_host = conf["is_host"].strip().lower() in ("1", "true", "yes", "y")
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=_DEFAULT_PORT)
    # The agents' own timeout for reaching the store (join_timeout) bounds how late the host may start.
    connect = timedelta(seconds=float(conf.get("join_timeout", 600)))
    try:
        store = dist.TCPStore(host, port, is_master=is_host, wait_for_workers=False, timeout=connect)
        if args.rdzv_id == "none":  # the env form: every node learns the id the first agent drew
            args.rdzv_id = bytes(store.compare_set("moe-train-torchrun/run-id", "", uuid.uuid4().hex)).decode()
    except (RuntimeError, TimeoutError, ConnectionError, ValueError) as e:
        _say(_rendezvous_line(args, e, debug, rendezvous_fix))
        return 1
    agents, exited = f"moe-train-torchrun/{args.rdzv_id}/agents", f"moe-train-torchrun/{args.rdzv_id}/exited"
    store.add(agents, 1)
    try:
        args.rdzv_conf = ",".join(f"{k}={v}" for k, v in {**conf, "is_host": "0"}.items())
        line, code = _attempt(args, debug, rendezvous_fix)
        _say(line)
        return code
    finally:
        try:
            store.add(exited, 1)
        except Exception:  # the host is gone (lost node): nobody is waiting for this count
            pass
        if is_host:
            deadline = time.monotonic() + EXIT_WAIT_S
            while store.add(exited, 0) < store.add(agents, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            missing = store.add(agents, 0) - store.add(exited, 0)
            if missing > 0:
                print(
                    f"moe-train-torchrun: {missing} agent(s) did not finish within {EXIT_WAIT_S:.0f} s "
                    "(lost mid-job?); closing the rendezvous store",
                    file=sys.stderr,
                )


def signal_lead_s(sbatch_signal: str | None) -> int | None:
    """Seconds before the time limit that ``sbatch --signal`` (or ``SBATCH_SIGNAL``) sends SIGUSR1 to the job's
    steps; None when it sends nothing to them (unset, another signal, or ``B:`` for the batch shell only)."""
    if not sbatch_signal:
        return None
    scope, _, spec = sbatch_signal.rpartition(":")
    name, _, lead = spec.partition("@")
    if scope.upper() == "B" or name.upper().removeprefix("SIG") not in ("USR1", "10"):
        return None
    try:
        return int(lead or 60)  # Slurm's default lead time
    except ValueError:
        return None


def launch(argv: list[str], rendezvous_fix: str | None = None) -> int:
    """torchrun with ``argv``; returns the exit code after printing at most one line of its own."""
    from torch.distributed import run as torch_run

    args = torch_run.parse_args(argv)
    lead = signal_lead_s(os.environ.get("SBATCH_SIGNAL"))
    if lead and args.shutdown_timeout is None:
        # torchrun treats SIGUSR1 as a stop: it passes it to the ranks and SIGKILLs them after its shutdown
        # timeout (30 s).  Slurm's warning leaves `lead` seconds before the time limit; the ranks get them all.
        args.shutdown_timeout = max(lead, 30)
    debug = "--debug" in args.training_script_args
    if not debug:  # the agent's own line for each failed rank; ours names the root cause instead
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DROP_FAILED_RANK_LINE)
    os.environ[LAUNCHER_ENV] = "1"  # the ranks leave the error line to us
    return _run_keeping_the_store(args, debug, rendezvous_fix)


def main(argv: list[str] | None = None) -> None:
    sys.exit(launch(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
