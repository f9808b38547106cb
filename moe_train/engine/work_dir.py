"""Start-up checks that the work dir can hold a run: it outlives the job, and every node sees the same one.

A relative path, or the TorchX components' default work dir under the submission directory, is right on
a Slurm cluster's shared file system and wrong in a Kubernetes pod, whose root file system dies with the
pod (and is not shared between pods).  TorchX does not tell a component its scheduler, so the trainer
checks where it runs: inside a pod (``KUBERNETES_SERVICE_HOST`` is set) a local work dir on the
container's root file system is refused before anything is trained.  Whatever the scheduler, rank 0
writes a probe into the work dir and every rank must read it back: two nodes that each see their own
local directory under the same name would otherwise each write "the" run.
"""

from __future__ import annotations

import os
import socket
import uuid

import torch.distributed as dist

from moe_train.run_dir import RunDir
from moe_train.storage import is_local, redact

_POD_FIX = (
    "pass --work_dir s3://BUCKET/runs/NAME (an object store), or mount a persistent volume and put the work "
    "dir on it (--mounts type=volume,src=CLAIM,dst=/checkpoints --work_dir /checkpoints/NAME)"
)


def mount_point(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The mount point holding ``path`` (its deepest existing parent), from the kernel's mount table."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and path != "/":
        path = os.path.dirname(path)
    try:
        with open(mountinfo) as f:
            points = [line.split()[4].replace("\\040", " ") for line in f if len(line.split()) > 4]
    except OSError:
        return None
    holding = [p for p in points if path == p or path.startswith(p.rstrip("/") + "/")]
    return max(holding, key=len) if holding else None


def check_outlives_pod(run: RunDir, environ: dict[str, str] | None = None) -> None:
    """Inside a Kubernetes pod, refuse a local work dir on the container's own root file system."""
    environ = os.environ if environ is None else environ
    if not environ.get("KUBERNETES_SERVICE_HOST") or not is_local(run.fs):
        return
    if mount_point(run.root) == "/":
        raise ValueError(
            f"work dir {redact(run.url)} is on the container's own file system, which is lost with the pod and not "
            f"shared with the other pods; {_POD_FIX}"
        )


def check_shared(run: RunDir, rank: int, world: int) -> None:
    """Every rank sees the file rank 0 writes into the work dir, or every rank raises the same line."""
    if world == 1:
        return
    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    probe = run.probe(f"shared-probe-{box[0]}")
    if rank == 0:
        with run.fs.open(probe, "w") as f:
            f.write("written by rank 0 on " + socket.gethostname())
    dist.barrier()
    run.fs.invalidate_cache(run.root)
    seen = [None] * world
    dist.all_gather_object(seen, (run.fs.exists(probe), socket.gethostname()))
    dist.barrier()
    if rank == 0:
        run.fs.rm(probe)
    blind = [(r, host) for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        who = ", ".join(f"rank {r} on {host}" for r, host in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise ValueError(
            f"work dir {redact(run.url)} is not the same directory on every node: {who} cannot see the file "
            f"rank 0 ({seen[0][1]}) wrote into it; pass a --work-dir every node shares (an absolute path on a "
            "shared file system) or an object-store URL (s3://...)"
        )
