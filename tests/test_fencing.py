"""The lease as a fencing token (moe_train/engine/lease.py), each fault injected for real:

1. a frozen holder (SIGSTOP inside its checkpoint's COMPLETE write, past its lease check) wakes after
   another job took over, trained on and released: it stops with exit 75 and one line, and whatever it
   wrote late is ignored by resume, metrics and report (2 ranks, real runs);
2. the S3 store goes away (a TCP proxy in front of the moto server drops every connection): the
   heartbeat survives botocore's errors, retries, and the holder stops itself before its lease may be
   taken over; the next job then takes the next generation;
3. two job steps of one Slurm job: the second is refused while the first lives; a requeue (a higher
   SLURM_RESTART_COUNT) takes over at once and the first stops with one line.

Lease timings are shortened by configuration (MOE_TRAIN_LEASE_EXPIRY_S, MOE_TRAIN_LEASE_HEARTBEAT_S).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moe_train.checkpoint.training_state import CheckpointManager
from moe_train.engine.lease import EXIT_LEASE_LOST, Lease
from moe_train.engine.metrics import read_metrics
from moe_train.report import load_run
from moe_train.run_dir import RunDir
from tests.launch import check, cpu_env, torchrun, torchrun_cmd
from tests.test_lease import rank_pids, s3

EXPIRY_S, HEARTBEAT_S = 6.0, 0.5
LEASE_ENV = {"MOE_TRAIN_LEASE_EXPIRY_S": str(EXPIRY_S), "MOE_TRAIN_LEASE_HEARTBEAT_S": str(HEARTBEAT_S)}

# Test-only: SIGSTOP this rank when it opens a named file (after the product's lease check: inside fs.open).
FREEZE_HOOK = """\
import json, os, signal, sys
spec = json.loads(os.environ.get("MOE_TEST_FREEZE", "null"))
if spec and os.environ.get("RANK") == str(spec["rank"]):
    def hook(event, args):
        if (event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike))
                and os.fsdecode(args[0]) == spec["path"] and not os.path.exists(spec["marker"])):
            with open(spec["marker"], "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
    sys.addaudithook(hook)
"""


def error_lines(text: str) -> list[str]:
    return sorted({line for line in text.splitlines() if line.startswith("Error:")})


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def wait(what: str, ready, timeout: float = 240.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise AssertionError(
                f"{what}: {'exited' if proc and proc.poll() is not None else 'timed out'}\n"
                + (log.read_text()[-4000:] if log else "")
            )
        time.sleep(0.05)


def complete(work: Path, step: int) -> dict:
    return json.loads((work / "checkpoints" / f"step-{step:08d}" / "COMPLETE").read_text())


# ------------------------------------------------------------------------------ 1. a frozen holder
@pytest.mark.slow
def test_a_holder_frozen_past_its_lease_check_wakes_after_a_takeover_and_its_late_writes_are_ignored(tmp_path):
    work = tmp_path / "work"
    args = ["tiny", "--deepspeed", "deepspeed_zero3", "--save-steps", "3", "--resume", "auto", "--work-dir", str(work)]
    frozen = tmp_path / "frozen"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FREEZE_HOOK)
    spec = {"rank": 0, "path": str(work / "checkpoints" / "step-00000006" / "COMPLETE"), "marker": str(frozen)}
    env_a = cpu_env(tmp_path, **LEASE_ENV, PYTHONPATH=str(hook), MOE_TEST_FREEZE=json.dumps(spec))
    with open(tmp_path / "a.err", "w") as err:
        a = subprocess.Popen(
            torchrun_cmd([*args, "--max-steps", "12"]), env=env_a, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        # A's rank 0 passed its lease checks and stops inside the open of step 6's COMPLETE; rank 1 waits.
        wait("A frozen in its step-6 COMPLETE write", frozen.exists, proc=a, log=tmp_path / "a.err")
        ranks = rank_pids(a.pid)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)  # rank 1 too: the whole job is paused (a suspended VM)
        time.sleep(EXPIRY_S + 0.5)  # the lease is now stale by the store's clock

        b = check(torchrun([*args, "--max-steps", "9"], tmp_path, env=cpu_env(tmp_path, **LEASE_ENV)))
        assert "took over the lease of" in b.stdout + b.stderr and "not renewed for" in b.stdout + b.stderr
        before = snapshot(work)
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        assert a.wait(timeout=120) != 0
    finally:
        a.kill()
    a_err = (tmp_path / "a.err").read_text()
    lines = error_lines(a_err)
    assert len(lines) == 1 and f"lease of {work}" in lines[0] and "stopped without writing more" in lines[0], a_err[
        -3000:
    ]
    assert f"exitcode  : {EXIT_LEASE_LOST}" in a_err  # torchrun's summary of rank 0

    # A wrote nothing after it woke: its pending COMPLETE of step 6 is created exclusively, and B's is there.
    assert snapshot(work) == before

    # One branch: B (generation 2) resumed from A's step 3 and wrote steps 6 and 9, its metrics and export.
    assert complete(work, 9)["generation"] == 2 and complete(work, 9)["resumed_from"] == 3
    export = json.loads((work / "hf_model" / "COMPLETE").read_text())
    assert (export["generation"], export["step"]) == (2, 9)
    run = RunDir(str(work))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 10))

    # What a stale holder writes late, whatever it is, loses to generation 2: a checkpoint past B's
    # branch point, metrics appended to its segment, a summary.
    assert complete(work, 6)["generation"] == 2
    shutil.copytree(work / "checkpoints" / "step-00000009", work / "checkpoints" / "step-00000012")
    (work / "checkpoints" / "step-00000012" / "COMPLETE").write_text(
        json.dumps({**complete(work, 9), "generation": 1, "resumed_from": 0})
    )  # read by its stamps before any verification
    (segment_a,) = [p for p in (work / "metrics").glob("segment-*.jsonl") if '"generation": 1' in p.read_text()]
    with segment_a.open("a") as f:
        for step in range(10, 40):
            f.write(json.dumps({"step": step, "loss": 9.0, "tgs": 1.0, "elapsed": 1.0}) + "\n")
    summary = json.loads((work / "summary.json").read_text())
    (work / "summary.json").write_text(json.dumps({**summary, "generation": 1, "steps": 39}))

    said: list[str] = []
    resumed = CheckpointManager(run, 0, 2).resolve("auto", log=said.append)
    assert resumed.step == 9 and resumed.manifest.generation == 2
    stale = [m for m in said if "lease generation 1 after generation 2 resumed from step 3" in m]
    assert any("step-00000012" in m for m in stale), said
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 10))
    assert load_run(str(work))["summary"] is None


# ------------------------------------------------------------------------------ 2. a store outage
class Proxy:
    """A TCP proxy in front of the S3 server; ``down()`` is an outage: every connection is cut and the
    endpoint refuses new ones (botocore's EndpointConnectionError, no OSError)."""

    def __init__(self, port: int) -> None:
        self.upstream, self.up, self.conns = port, True, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        self.up = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        except OSError:
            pass
        self.sock.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def close(self) -> None:
        self.down()


HOLDER = """\
import time
from moe_train.engine.lease import Lease
from moe_train.run_dir import RunDir
# botocore's own retries off (the product's S3_CONFIG retries 8 times): each renewal fails at once, so the
# heartbeat's own retries show; with them on, a renewal hangs and the watchdog stops the run the same way
run = RunDir({url!r}, {{"config_kwargs": {{"retries": {{"max_attempts": 1}}}}}})
Lease(run).acquire()
print("held", flush=True)
while True:  # training between two saves: each metrics record asks the heartbeat's verdict
    time.sleep(0.05)
    run.check_owner(sync=False)
"""


def test_a_store_outage_stops_the_holder_before_its_lease_can_be_taken_and_the_next_job_takes_over(tmp_path, s3_server):
    proxy = Proxy(int(s3_server["endpoint"].rsplit(":", 1)[1]))
    root = f"{s3_server['bucket']}/outage-{os.getpid()}"
    env = cpu_env(tmp_path, **LEASE_ENV, FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(url=f"s3://{root}")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        time.sleep(3 * HEARTBEAT_S)  # a few renewals through the proxy
        proxy.down()
        cut = time.monotonic()
        assert holder.wait(timeout=60) == EXIT_LEASE_LOST
        stopped_after = time.monotonic() - cut
    finally:
        holder.kill()
        proxy.close()
    err = holder.stderr.read()
    assert stopped_after < EXPIRY_S, err  # before anyone may take the lease over
    retries = [line for line in err.splitlines() if line.startswith("[moe-train] could not renew the lease")]
    assert len(retries) >= 2, err  # the heartbeat survived the store's errors and retried
    (line,) = error_lines(err)
    assert line.startswith(f"Error: the lease of s3://{root} was not renewed for ") and "check the store" in line
    assert "the last error: EndpointConnectionError" in line

    fs = s3(s3_server)  # the store is back (directly): the next job takes the next generation
    taker = Lease(RunDir(root, fs=fs), stale_s=EXPIRY_S, heartbeat_s=HEARTBEAT_S)
    try:
        assert taker.acquire().endswith(f"(pid {holder.pid} on this host is gone)") and taker.generation == 2
    finally:
        taker.release()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/lease")] == ["00000002.json"]


# ------------------------------------------------------------------------------ 3. one Slurm job id
def test_a_second_step_of_the_same_slurm_job_is_refused_while_the_first_lives_and_a_requeue_takes_over(
    tmp_path, monkeypatch
):
    work = tmp_path / "work"
    script = (
        "import time; from moe_train.engine.lease import Lease; from moe_train.run_dir import RunDir; "
        f"Lease(RunDir({str(work)!r})).acquire(); print('held', flush=True); time.sleep(60)"
    )
    env = cpu_env(tmp_path, **LEASE_ENV, SLURM_JOB_ID="4242")
    env.pop("SLURM_RESTART_COUNT", None)
    first = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline() == "held\n", first.stderr.read()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        with pytest.raises(ValueError, match=r"is in use by job slurm:4242 .*lease renewed \d+s ago"):
            Lease(RunDir(str(work)), stale_s=EXPIRY_S, heartbeat_s=HEARTBEAT_S).acquire()
        assert first.poll() is None  # untouched

        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # Slurm requeued the job: restart 0 is over
        requeued = Lease(RunDir(str(work)), stale_s=EXPIRY_S, heartbeat_s=HEARTBEAT_S)
        assert requeued.acquire() == f"took over the lease of {work} from restart 0 of this Slurm job (now restart 1)"
        assert first.wait(timeout=20) == EXIT_LEASE_LOST
    finally:
        first.kill()
    (line,) = error_lines(first.stderr.read())
    assert line.startswith(
        f"Error: job slurm:4242 (host {socket.gethostname()}) took over the lease of {work} "
        "(generation 2; this job held 1)"
    )
    requeued.release()
    assert json.loads((work / "lease" / "00000002.json").read_text())["released"] is True
