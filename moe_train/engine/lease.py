"""One owner per work dir: a lease object in the work dir, taken by rank 0 before anything is written.

Layout: ``{work_dir}/lease/{generation:08d}.json``.  The highest generation is the lease; each new
owner creates the next generation with an exclusive create (``O_EXCL`` on local and NFS paths,
``If-None-Match: *`` on S3, which s3fs sends for mode ``"xb"``), so of two jobs racing for a work
dir exactly one wins.  The owner rewrites its generation every ``HEARTBEAT_S`` from a thread; the
lease's age is the store's own clock (the modification time of the lease against that of a probe
object written just now), never a node's.

Who may take the lease:
- nobody holds it (no lease: the last owner deleted it when it ended): anyone;
- the same scheduler job (a Slurm requeue, a TorchX retry, a torchrun restart round): at once;
- another job: at once when its owner provably died (same host and PID namespace, its pid gone),
  else once the lease is ``STALE_S`` old (its owner died on another node without releasing it);
  until then the run stops with one line naming the owner.

A work dir that holds an earlier run (metrics, checkpoints, export) is reused only with
``--resume`` (continue it) or ``--overwrite`` (move it aside into ``previous/{time}/``; nothing is
deleted).  Only the owner removes anything in a work dir, so start-up never touches the files of
another live run.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import torch.distributed as dist

from moe_train.run_dir import RunDir
from moe_train.storage import is_local

HEARTBEAT_S = 15.0
STALE_S = 120.0  # 8 missed heartbeats: longer than any pause of a healthy rank 0 between two writes
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: another job took the work dir over


def job_id(environ: dict[str, str] | None = None) -> str:
    """The scheduler job this process belongs to: the same across requeues, retries and restart rounds."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # TorchX passes its app id as --rdzv-id
        return f"torchrun:{run_id}"
    if "TORCHELASTIC_RUN_ID" in env:  # plain torchrun without --rdzv-id: the agent is the job
        return f"torchrun:{socket.gethostname()}:{os.getppid()}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _pid_namespace() -> str:
    """This process's PID namespace (containers on one host can share a hostname but not pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Write a new object; False when it already exists (never overwritten)."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def _replace(fs: Any, path: str, data: bytes) -> None:
    """Overwrite atomically: readers see the old or the new content, never a partial one."""
    if is_local(fs):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # an object PUT is atomic
        fs.pipe_file(path, data)


def _mtime(fs: Any, path: str) -> float:
    m = fs.modified(path)
    return (m if m.tzinfo else m.replace(tzinfo=timezone.utc)).timestamp()


class Lease:
    """The lease of one work dir, held by rank 0 of the owning job."""

    def __init__(self, run: RunDir, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.run, self.fs, self.dir = run, run.fs, run.lease
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.owner = {
            "job": job_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "round": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "pidns": _pid_namespace(),
        }
        self.generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return self.run.where

    def _path(self, generation: int) -> str:
        return posixpath.join(self.dir, f"{generation:08d}.json")

    def _generations(self) -> list[int]:
        self.fs.invalidate_cache(self.dir)  # other jobs write here: never answer from a listing cache
        if not self.fs.exists(self.dir):
            return []
        names = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.dir, detail=False))
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, generation: int) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self._path(generation)))
        except (ValueError, FileNotFoundError):  # a foreign or vanished file: treat as unowned
            return {}

    def _holder_is_gone(self, holder: dict[str, Any]) -> bool:
        """True only when the holder ran on this host, in this PID namespace, and its process is gone."""
        if (
            holder.get("host") != self.owner["host"]
            or holder.get("pidns") != self.owner["pidns"]
            or not holder.get("pidns")
        ):
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return False

    def _store_now(self) -> float:
        """The store's clock: the modification time of a probe object written now."""
        probe = posixpath.join(self.dir, f"clock-{uuid.uuid4().hex}")
        self.fs.pipe_file(probe, b"")
        try:
            return _mtime(self.fs, probe)
        finally:
            self.fs.rm(probe)

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()

    def acquire(self) -> str | None:
        """Take the lease or raise ValueError naming the owner; returns a line to log on a takeover."""
        self.fs.makedirs(self.dir, exist_ok=True)
        for _ in range(3):  # lost races re-read the lease; a third loss means a busy contender
            gens = self._generations()
            note = None
            if gens:
                current = gens[-1]
                holder = self._read(current)
                if holder and holder.get("job") != self.owner["job"] and self._holder_is_gone(holder):
                    note = (
                        f"took over the lease of {self.where} from job {holder.get('job')} (pid "
                        f"{holder.get('pid')} on this host is gone)"
                    )
                elif holder and holder.get("job") != self.owner["job"]:
                    age = self._store_now() - _mtime(self.fs, self._path(current))
                    if age < self.stale_s:
                        raise ValueError(
                            f"work dir {self.where} is in use by job {holder.get('job')} (host {holder.get('host')}, "
                            f"pid {holder.get('pid')}, lease renewed {max(age, 0):.0f}s ago); wait for it to finish, "
                            f"pass another --work-dir, or, if that job is dead, rerun once its lease is "
                            f"{self.stale_s:g}s old ({self._path(current)})"
                        )
                    note = (
                        f"took over the lease of {self.where} from job {holder.get('job')} (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}): not renewed for {age:.0f}s"
                    )
                elif holder:
                    note = f"took over the lease of {self.where} from round {holder.get('round')} of this job"
                generation = current + 1
            else:
                generation = 1
            if _create_exclusive(self.fs, self._path(generation), self._record()):
                self.generation = generation
                for old in gens:  # the previous owners' generations: only the new owner deletes
                    self.fs.rm(self._path(old))
                self._start_heartbeat()
                return note
        raise ValueError(
            f"work dir {self.where}: another job keeps taking the lease at the same time; run one job per --work-dir"
        )

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="moe-train-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                newer = [g for g in self._generations() if g > self.generation]
                if newer:
                    taker = self._read(newer[-1])
                    os.write(
                        2,
                        f"[moe-train] job {taker.get('job')} (host {taker.get('host')}) took over the lease "
                        f"of {self.where} after this job did not renew it for {self.stale_s:g}s; exiting "
                        "without writing more\n".encode(),
                    )
                    os._exit(EXIT_LEASE_LOST)
                _replace(self.fs, self._path(self.generation), self._record())
            except OSError as e:  # a store hiccup: the next beat retries, well within STALE_S
                os.write(2, f"[moe-train] could not renew the lease of {self.where}: {e}\n".encode())

    def release(self) -> None:
        """Give the lease up (delete it), so the next run on this work dir starts at once."""
        if self.generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.fs.rm(self._path(self.generation))
            if is_local(self.fs) and not self.fs.ls(self.dir):
                self.fs.rmdir(self.dir)  # a run refused at start-up leaves the work dir as it was
        except OSError:
            pass  # the lease goes stale and is taken over after STALE_S
        self.generation = None


class NoLease:
    """What ranks other than 0 hold: rank 0 owns the lease for the whole job."""

    def release(self) -> None:
        pass


def own_work_dir(run: RunDir, rank: int, resume: str | None, overwrite: bool, log=print) -> Lease | NoLease:
    """Rank 0 takes the lease and checks the work dir is free to use; every rank learns the outcome."""
    if overwrite and resume:
        raise ValueError("--overwrite moves the earlier run aside and --resume continues it; pass one of them")
    error, lease = None, NoLease()
    if rank == 0:
        lease = Lease(run)
        try:
            note = lease.acquire()
            if note:
                log(note)
            found = run.run_files()
            if found and not resume and not overwrite:  # --overwrite: moved aside once every input is checked
                raise ValueError(
                    f"work dir {run.where} holds an earlier run ({', '.join(found)}); continue it "
                    "with --resume auto, pass a new --work-dir, or pass --overwrite to move it aside "
                    f"into {posixpath.basename(run.previous)}/"
                )
        except (ValueError, OSError) as e:
            lease.release()
            error = str(e) if isinstance(e, ValueError) else f"work dir {run.where}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)
    return lease
