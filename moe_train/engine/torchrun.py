"""torchrun whose rendezvous store outlives every node's agent: ``moe-train-torchrun ARGS``.

With ``--rdzv-backend c10d`` the agent that hosts the store (``--rdzv-conf is_host=1``) keeps it in
its own process.  At the end of a job every agent waits at torchrun's exit barrier, then closes the
rendezvous on that store; the host, done first, exits and takes the store with it while another
node's agent is still closing, which prints a C++ ``TCPStore recvVector failed`` trace and a
``failed to shutdown the rendezvous`` warning after a run that succeeded.  No sleep closes that
race (everyone leaves the barrier together), so on the host node this process serves the store
itself and hands torchrun ``is_host=0``; every agent of the job counts itself in on the store
before torchrun starts and out when torchrun has returned, and the store stays up until the counts
agree (or :data:`EXIT_WAIT_S` has passed: an agent lost mid-job never counts out).

Everything else is torchrun's own ``main``, in this process, so signals (Slurm's SIGTERM, Kubernetes'
stop) reach torchrun's handlers as they do under plain ``torchrun``, and the exit status is the same.
Without c10d, an explicit ``is_host`` or more than one node, it is plain torchrun.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

EXIT_WAIT_S = 30.0  # longest the store host waits for the other agents after its own has finished
_DEFAULT_PORT = 29400  # torchrun's for c10d


def _rdzv_conf(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    args = torch_run.parse_args(sys.argv[1:] if argv is None else argv)
    run = record(torch_run.run)  # what torchrun's own main is: run(args) with its error file and summary
    conf = _rdzv_conf(args.rdzv_conf)
    _, max_nodes = torch_run.parse_min_max_nnodes(args.nnodes)
    if args.standalone or args.rdzv_backend != "c10d" or "is_host" not in conf or max_nodes == 1:
        run(args)
        return

    is_host = conf["is_host"].strip().lower() in ("1", "true", "yes", "y")
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=_DEFAULT_PORT)
    # The agents' own timeout for reaching the store (join_timeout) bounds how late the host may start.
    connect = timedelta(seconds=float(conf.get("join_timeout", 600)))
    store = dist.TCPStore(host, port, is_master=is_host, wait_for_workers=False, timeout=connect)
    agents, exited = f"moe-train-torchrun/{args.rdzv_id}/agents", f"moe-train-torchrun/{args.rdzv_id}/exited"
    store.add(agents, 1)
    try:
        args.rdzv_conf = ",".join(f"{k}={v}" for k, v in {**conf, "is_host": "0"}.items())
        run(args)
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


if __name__ == "__main__":
    main()
