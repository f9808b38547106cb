"""One owner per work dir, even across a pause or a store outage: the lease is a fencing token.

Layout: ``{work_dir}/lease/{generation:08d}.json``.  The highest generation is the lease; each new
owner creates the next generation with an exclusive create (``O_EXCL`` on local and NFS paths,
``If-None-Match: *`` on S3, which s3fs sends for mode ``"xb"``), so of two jobs racing for a work
dir exactly one wins.  Exclusive create is the only conditional write relied on (here, and for a
checkpoint's COMPLETE): s3fs sends no ``If-Match``, so a renewal or a tombstone is a plain overwrite of
the owner's own generation file.  Generations never
restart in a work dir: the owner's file stays when it ends, rewritten as a tombstone (``released``);
the next owner takes the next generation and deletes the older files.

The owner (rank 0) rewrites its generation every ``heartbeat_s`` from a thread; the lease's age is
the store's own clock (the modification time of the lease against that of a probe object written
just now), never a node's.  Fencing, so that a holder that was paused (SIGSTOP, a suspended VM) or
cut off from the store never writes after another job took over:
- before every checkpoint save, its COMPLETE, the export's COMPLETE, each prune and move-aside the
  owner re-reads the lease (``check(sync=True)``, through the run directory's writes); other writes
  (metrics) use the heartbeat's cached verdict;
- a renewal that fails (any exception: a store outage is botocore's, not an ``OSError``) is retried
  with backoff; once the lease has gone unrenewed for ``give_up_s`` (three quarters of ``stale_s``) a
  watchdog thread ends the run with exit 75 and one line, before another job may take it over;
- every durable record carries the owner's generation (checkpoint and export COMPLETE, metrics
  segments, summary.json): what a stale holder writes in the window between its check and its write
  is ignored by every reader, as a later generation outranks it.

Who may take the lease: anyone when it is released (a tombstone) or absent; otherwise only from a
holder that is provably gone: same host and PID namespace with its pid dead, the same Slurm job with
a higher ``SLURM_RESTART_COUNT`` (a requeue: the scheduler ended the old run), or a lease ``stale_s``
old by the store's clock.  A matching job id alone proves nothing (two job steps of one Slurm job).
Until then the run stops with one line naming the owner.  Timings: ``MOE_TRAIN_LEASE_EXPIRY_S``
(default 120) and ``MOE_TRAIN_LEASE_HEARTBEAT_S`` (15); every job on a work dir must use the same.

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
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import torch.distributed as dist

from moe_train.run_dir import RunDir
from moe_train.storage import is_local

HEARTBEAT_S = 15.0
STALE_S = 120.0  # 8 missed heartbeats: longer than any pause of a healthy rank 0 between two writes
GIVE_UP = 0.75  # of STALE_S without a renewal: the owner stops itself before anyone may take over
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: the work dir is (or may be) another job's now


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds; unset it or pass e.g. {default:g}") from None


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
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp):  # a full disk: no partial file left behind
                os.remove(tmp)
            raise
    else:  # an object PUT is atomic
        fs.pipe_file(path, data)


def _mtime(fs: Any, path: str) -> float:
    m = fs.modified(path)
    return (m if m.tzinfo else m.replace(tzinfo=timezone.utc)).timestamp()


def _exit_lost(line: str) -> None:
    """End this process now with EXIT_LEASE_LOST and one line: nothing more may be written (no cleanup)."""
    os.write(2, f"\nError: {line}\n".encode())  # on a line of its own, after a progress bar too
    os._exit(EXIT_LEASE_LOST)


class Lease:
    """The lease of one work dir, held by rank 0 of the owning job; the run directory's fence."""

    def __init__(self, run: RunDir, stale_s: float | None = None, heartbeat_s: float | None = None) -> None:
        self.run, self.fs, self.dir = run, run.fs, run.lease
        self.stale_s = stale_s if stale_s is not None else _seconds("MOE_TRAIN_LEASE_EXPIRY_S", STALE_S)
        self.heartbeat_s = (
            heartbeat_s if heartbeat_s is not None else _seconds("MOE_TRAIN_LEASE_HEARTBEAT_S", HEARTBEAT_S)
        )
        self.give_up_s = GIVE_UP * self.stale_s
        self.owner = {
            "job": job_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "round": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "pidns": _pid_namespace(),
            "token": uuid.uuid4().hex,  # this holder, whatever its job id
        }
        self.generation: int | None = None
        self._first = False  # no generation existed before this one
        self._renewed = 0.0  # time.monotonic() before the last renewal that reached the store
        self._error: BaseException | None = None  # the last failed renewal's
        self._busy_since: float | None = None  # time.monotonic() when the renewal in flight began
        self._stopping = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

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
            record = json.loads(self.fs.cat_file(self._path(generation)))
        except (ValueError, FileNotFoundError):  # a foreign or vanished file: treat as unowned
            return {}
        return record if isinstance(record, dict) else {}

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

    def _requeued(self, holder: dict[str, Any]) -> bool:
        """The same Slurm job, restarted since: Slurm ended the holder's run before it requeued the job."""
        restart = holder.get("restart")
        return (
            str(holder.get("job", "")).startswith("slurm:")
            and holder.get("job") == self.owner["job"]
            and type(restart) is int
            and restart < self.owner["restart"]
        )

    def _store_now(self) -> float:
        """The store's clock: the modification time of a probe object written now."""
        probe = posixpath.join(self.dir, f"clock-{uuid.uuid4().hex}")
        self.fs.pipe_file(probe, b"")
        try:
            return _mtime(self.fs, probe)
        finally:
            self.fs.rm(probe)

    def _record(self, **extra: Any) -> bytes:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return json.dumps({**self.owner, "generation": self.generation, "since": now, **extra}).encode()

    def _takeover_note(self, current: int, holder: dict[str, Any]) -> str | None:
        """None when the lease is free; a line when its holder is provably gone; else ValueError."""
        if not holder or holder.get("released"):
            return None
        who = f"job {holder.get('job')}"
        if self._holder_is_gone(holder):
            return f"took over the lease of {self.where} from {who} (pid {holder.get('pid')} on this host is gone)"
        if self._requeued(holder):
            return (
                f"took over the lease of {self.where} from restart {holder.get('restart')} of this Slurm job "
                f"(now restart {self.owner['restart']})"
            )
        age = self._store_now() - _mtime(self.fs, self._path(current))
        if age < self.stale_s:
            raise ValueError(
                f"work dir {self.where} is in use by {who} (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, lease renewed {max(age, 0):.0f}s ago); wait for it to finish, "
                f"pass another --work-dir, or, if that job is dead, rerun once its lease is "
                f"{self.stale_s:g}s old ({self._path(current)})"
            )
        return (
            f"took over the lease of {self.where} from {who} (host {holder.get('host')}, pid "
            f"{holder.get('pid')}): not renewed for {age:.0f}s"
        )

    def acquire(self) -> str | None:
        """Take the next generation of the lease or raise ValueError naming the owner; returns a line to
        log on a takeover."""
        self.fs.makedirs(self.dir, exist_ok=True)
        for _ in range(3):  # lost races re-read the lease; a third loss means a busy contender
            gens = self._generations()
            note = self._takeover_note(gens[-1], self._read(gens[-1])) if gens else None
            generation = gens[-1] + 1 if gens else 1
            self.generation = generation
            self._renewed = time.monotonic()
            if _create_exclusive(self.fs, self._path(generation), self._record()):
                self._first = not gens
                self.run.fence = self
                for old in gens:  # the previous owners' generations: only the new owner deletes
                    self.fs.rm(self._path(old))
                self._start()
                return note
            self.generation = None
        raise ValueError(
            f"work dir {self.where}: another job keeps taking the lease at the same time; run one job per --work-dir"
        )

    # ------------------------------------------------------------------ holding it
    def _taken_by(self) -> dict[str, Any] | None:
        """None while the lease is this holder's; else the newer holder's record ({} when unknown)."""
        gens = self._generations()
        if gens and gens[-1] > self.generation:
            return self._read(gens[-1]) or {}
        record = self._read(self.generation)
        if record.get("token") == self.owner["token"] and not record.get("released"):
            return None
        return {}  # this generation's file vanished or was rewritten by another holder: not ours any more

    def _lost(self, holder: dict[str, Any]) -> None:
        with self._stopping:
            by = f"job {holder.get('job')} (host {holder.get('host')})" if holder.get("job") else "another job"
            _exit_lost(
                f"{by} took over the lease of {self.where} (generation {holder.get('generation', '?')}; this job "
                f"held {self.generation}) while this job was paused or did not renew it for {self.stale_s:g}s; "
                "this job stopped without writing more: let that job finish, then continue with --resume auto"
            )

    def _expired(self) -> None:
        with self._stopping:
            now = time.monotonic()
            idle, busy = now - self._renewed, self._busy_since
            if self._error is not None:
                why = f"the last error: {type(self._error).__name__}: {self._error}"
            elif busy is not None and now - busy > self.heartbeat_s:
                why = f"a renewal has not returned for {now - busy:.0f}s: the store is unreachable or stalled"
            else:
                why = "this process was paused"
            _exit_lost(
                f"the lease of {self.where} was not renewed for {idle:.0f}s ({why}); this job stopped without "
                f"writing more before another job may take the work dir over ({self.stale_s:g}s): check the "
                "store, then continue with --resume auto"
            )

    def check(self, sync: bool = False) -> None:
        """Before a durable write: stop (exit 75, one line) unless the lease is still this holder's.
        ``sync``: re-read the lease from the store now; else the heartbeat's verdict."""
        if self.generation is None:
            return
        if time.monotonic() - self._renewed > self.give_up_s:
            self._expired()
        if not sync:
            return
        try:
            holder = self._taken_by()
        except Exception:  # noqa: BLE001 - the store is unreachable: the write fails by itself, the watchdog bounds the wait
            return
        if holder is not None:
            self._lost(holder)

    def _start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._beat, name="moe-train-lease", daemon=True),
            threading.Thread(target=self._watch, name="moe-train-lease-watchdog", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _beat(self) -> None:
        """Renew every heartbeat_s; a failure of any kind is retried sooner, backing off to heartbeat_s."""
        wait, failures = self.heartbeat_s, 0
        while not self._stop.wait(wait):
            started = self._busy_since = time.monotonic()
            try:
                holder = self._taken_by()
                if holder is not None:
                    self._lost(holder)
                _replace(self.fs, self._path(self.generation), self._record())
            except Exception as e:  # noqa: BLE001 - any store error (botocore's are no OSError): retry
                failures += 1
                self._error = e
                wait = min(self.heartbeat_s, self.heartbeat_s / 8 * 2**failures)
                os.write(
                    2,
                    f"[moe-train] could not renew the lease of {self.where} ({type(e).__name__}: {e}); retry "
                    f"{failures} in {wait:.1f}s, stopping the run if it is not renewed within "
                    f"{self.give_up_s:.0f}s of the last renewal\n".encode(),
                )
            else:
                self._renewed, self._error, wait, failures = started, None, self.heartbeat_s, 0
            finally:
                self._busy_since = None

    def _watch(self) -> None:
        """Apart from the heartbeat, which a hung store call can block: stop before the lease may expire."""
        while not self._stop.wait(min(1.0, self.heartbeat_s / 2)):
            if time.monotonic() - self._renewed > self.give_up_s:
                self._expired()

    def release(self, wrote: bool = True) -> None:
        """Give the lease up: a tombstone of this generation, so the next run starts at once and takes the
        next generation.  ``wrote=False`` (a start that failed before writing): a first generation is
        removed instead, so a refused start leaves the work dir as it was."""
        if self.generation is None:
            return
        self.check(sync=True)  # a holder that lost the lease (its last write failed on that) exits 75 here
        self._stop.set()
        for t in self._threads:
            t.join()
        try:
            if self._taken_by() is None:  # never tombstone a generation another job superseded
                if wrote or not self._first:
                    _replace(self.fs, self._path(self.generation), self._record(released=True))
                else:
                    self.fs.rm(self._path(self.generation))
                    if is_local(self.fs) and not self.fs.ls(self.dir):
                        self.fs.rmdir(self.dir)
        except Exception:  # noqa: BLE001 - (a full disk) the record stays, taken over once provably gone
            pass
        self.generation = None
        self.run.fence = None


class NoLease:
    """What ranks other than 0 hold: rank 0 owns the lease for the whole job."""

    def release(self, wrote: bool = True) -> None:
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
            lease.release(wrote=False)
            error = str(e) if isinstance(e, ValueError) else f"work dir {run.where}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)
    return lease
