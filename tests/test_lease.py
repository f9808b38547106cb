"""One owner per work dir (moe_train/engine/lease.py): in-process on a local dir and a real S3 server,
then real 2-rank runs: a second job on a live work dir is refused and the first finishes untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from moe_train.engine.lease import STALE_S, Lease, _create_exclusive, own_work_dir
from moe_train.run_dir import RunDir
from tests.launch import check, cpu_env, metrics, torchrun, torchrun_cmd


def lease_for(fs, root: str, job: str) -> Lease:
    lease = Lease(RunDir(root, fs=fs), heartbeat_s=0.2)
    lease.owner["job"] = job
    return lease


def stop_heartbeat(lease: Lease) -> None:
    """As if the holder were SIGKILLed: its lease stays behind, unrenewed (and this process is not ended)."""
    lease._stop.set()
    for t in lease._threads:
        t.join()


def s3(s3_server):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "work")
    s3_server = request.getfixturevalue("s3_server")
    return s3(s3_server), f"{s3_server['bucket']}/lease-{request.node.name}-{os.getpid()}".replace("[", "-").rstrip("]")


def test_exclusive_create_is_honoured(store):
    fs, root = store
    fs.makedirs(root, exist_ok=True)
    assert _create_exclusive(fs, f"{root}/x", b"first")
    assert not _create_exclusive(fs, f"{root}/x", b"second")
    assert fs.cat_file(f"{root}/x") == b"first"


def test_second_job_is_refused_naming_the_owner_and_a_requeue_takes_over(store):
    fs, root = store
    first = lease_for(fs, root, "slurm:100")
    assert first.acquire() is None
    try:
        for job in ("slurm:200", "slurm:100"):  # the same job id alone proves nothing: two steps of one job
            with pytest.raises(
                ValueError,
                match=rf"in use by job slurm:100 \(host .*, pid {os.getpid()}, lease renewed "
                rf"\d+s ago\); .*once its lease is {STALE_S:g}s old",
            ):
                lease_for(fs, root, job).acquire()
        time.sleep(0.5)  # heartbeats rewrite the lease meanwhile
        stop_heartbeat(first)  # the first attempt dies (its heartbeat would see the takeover and end this process)
        requeued = lease_for(fs, root, "slurm:100")
        requeued.owner["restart"] = 1  # SLURM_RESTART_COUNT: Slurm ended restart 0 before requeueing
        assert requeued.acquire().endswith(f"{root} from restart 0 of this Slurm job (now restart 1)")
        assert requeued.generation == 2 and [p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/lease")] == ["00000002.json"]
        requeued.release()
        tombstone = json.loads(fs.cat_file(f"{root}/lease/00000002.json"))  # kept: generations never restart
        assert tombstone["released"] is True and tombstone["generation"] == 2 and tombstone["job"] == "slurm:100"
        after = lease_for(fs, root, "slurm:300")
        assert after.acquire() is None and after.generation == 3  # a released lease is free at once
        after.release()
        assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/lease")] == ["00000003.json"]
    finally:
        stop_heartbeat(first)


def test_a_stale_lease_is_taken_over_and_its_holder_exits(tmp_path):
    """Ages come from modification times: a lease not renewed for STALE_S goes to the next job."""
    fs, root = fsspec.filesystem("file"), str(tmp_path / "work")
    Path(root, "lease").mkdir(parents=True)
    dead = Path(root, "lease", "00000001.json")
    dead.write_text(json.dumps({"job": "slurm:1", "host": "node7", "pid": 4242}))
    os.utime(dead, (time.time() - STALE_S - 5,) * 2)
    taker = lease_for(fs, root, "slurm:2")
    note = taker.acquire()
    assert note.startswith(f"took over the lease of {root} from job slurm:1 (host node7, pid 4242): not renewed for")
    assert not dead.exists() and Path(root, "lease", "00000002.json").exists()
    taker.release()
    assert json.loads(Path(root, "lease", "00000002.json").read_text())["released"] is True

    # The holder of a lease that was taken over notices at its next heartbeat and stops writing.
    script = (
        "import time; from moe_train.engine.lease import Lease; from moe_train.run_dir import RunDir; "
        f"l = Lease(RunDir({str(tmp_path / 'w2')!r}), heartbeat_s=0.2); l.owner['job'] = 'a'; l.acquire(); "
        "time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=cpu_env(tmp_path))
    while not Path(tmp_path, "w2", "lease", "00000001.json").exists():
        time.sleep(0.05)
    Path(tmp_path, "w2", "lease", "00000002.json").write_text(json.dumps({"job": "b", "host": "node9"}))
    assert holder.wait(timeout=20) == 75
    assert "job b (host node9) took over the lease" in holder.stderr.read()


def test_a_lease_whose_process_on_this_host_is_gone_is_taken_over_at_once(tmp_path):
    """A killed job on this machine (torchrun SIGKILLed, its ranks with it) does not block the next for 120 s."""
    fs, root = fsspec.filesystem("file"), str(tmp_path / "work")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    gone = lease_for(fs, root, "torchrun:old")
    gone.owner["pid"] = int(dead.stdout)
    assert gone.acquire() is None
    stop_heartbeat(gone)
    taker = lease_for(fs, root, "torchrun:new")
    assert taker.acquire() == (
        f"took over the lease of {root} from job torchrun:old (pid {dead.stdout.strip()} on this host is gone)"
    )
    taker.release()


def test_finished_work_dir_is_refused_and_overwrite_leaves_it_for_setup_to_move(tmp_path):
    root = str(tmp_path / "work")
    Path(root, "checkpoints", "step-00000003").mkdir(parents=True)
    Path(root, "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(
        ValueError,
        match=r"holds an earlier run \(metrics.jsonl, checkpoints\); continue it with "
        r"--resume auto, pass a new --work-dir, or pass --overwrite",
    ):
        own_work_dir(RunDir(root), 0, resume=None, overwrite=False)
    own_work_dir(RunDir(root), 0, resume="auto", overwrite=False).release()
    # --overwrite: the lease is taken, the run stays until setup has checked every input (engine/setup.py)
    own_work_dir(RunDir(root), 0, resume=None, overwrite=True).release()
    assert Path(root, "metrics.jsonl").exists() and not Path(root, "previous").exists()
    RunDir(root).move_aside(RunDir(root).run_files())
    (moved,) = Path(root, "previous").iterdir()
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1}\n' and (
        moved / "checkpoints" / "step-00000003"
    ).is_dir()
    assert not Path(root, "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ real 2-rank runs
ARGS = ["tiny", "--deepspeed", "deepspeed_zero3"]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one Error: line of a failed run (each rank prints the same one)."""
    errors = {line for line in proc.stderr.splitlines() if line.startswith("Error:")}
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    return errors.pop()


def rank_pids(agent: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == agent:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return out


@pytest.mark.slow
def test_second_run_on_a_live_work_dir_is_refused_and_the_first_completes_untouched(tmp_path):
    work = tmp_path / "work"
    cmd = torchrun_cmd([*ARGS, "--work-dir", str(work), "--max-steps", "12", "--save-steps", "6"])
    # The first run is held (SIGSTOP) while the second starts: a lease long enough that it need not stop
    # itself on waking (tests/test_fencing.py covers that) however slow the second start is here.
    env = cpu_env(tmp_path, MOE_TRAIN_LEASE_EXPIRY_S="900")
    with open(tmp_path / "a.err", "w") as err:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not any('"loss"' in p.read_text() for p in (work / "metrics").glob("segment-*.jsonl")):  # a step done
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "a.err").read_text()[-3000:]
            time.sleep(0.05)
        ranks = rank_pids(first.pid)
        for pid in ranks:  # hold the first run mid-training, so the second surely meets it alive
            os.kill(pid, signal.SIGSTOP)
        before = sorted(p.relative_to(work) for p in work.rglob("*"))
        second = torchrun([*ARGS, "--work-dir", str(work), "--max-steps", "2", "--resume", "auto"], tmp_path, env=env)
        assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0, (tmp_path / "a.err").read_text()[-3000:]
    finally:
        first.kill()
    assert error_line(second).startswith(f"Error: work dir {work} is in use by job torchrun:")
    assert [m["step"] for m in metrics(work) if "loss" in m] == list(range(1, 13))
    assert (work / "checkpoints" / "step-00000012" / "COMPLETE").exists() and (work / "hf_model" / "COMPLETE").exists()
    assert json.loads((work / "summary.json").read_text())["steps"] == 12

    # Finished: a rerun without --resume is refused; --overwrite moves the run aside and starts afresh.
    again = torchrun([*ARGS, "--work-dir", str(work), "--max-steps", "2"], tmp_path)
    assert error_line(again).startswith(
        f"Error: work dir {work} holds an earlier run (metrics, summary.json, recipe.json, deepspeed.json, "
        "checkpoints, hf_model, tb); "
    )
    check(torchrun([*ARGS, "--work-dir", str(work), "--max-steps", "2", "--overwrite", "--no-export"], tmp_path))
    (moved,) = (work / "previous").iterdir()
    assert json.loads((moved / "summary.json").read_text())["steps"] == 12
    assert (moved / "checkpoints" / "step-00000012" / "COMPLETE").exists()
    assert [m["step"] for m in metrics(work) if "loss" in m] == [1, 2]


@pytest.mark.slow
def test_a_run_on_an_s3_work_dir_held_by_another_job_is_refused(tmp_path, s3_server):
    fs = s3(s3_server)
    root = f"{s3_server['bucket']}/held-{os.getpid()}"
    holder = lease_for(fs, root, "slurm:777")
    holder.acquire()
    try:
        env = cpu_env(tmp_path, FSSPEC_S3_ENDPOINT_URL=s3_server["endpoint"])
        proc = torchrun([*ARGS, "--work-dir", f"s3://{root}", "--max-steps", "2"], tmp_path, env=env)
    finally:
        holder.release()
    assert error_line(proc).startswith(f"Error: work dir s3://{root} is in use by job slurm:777")
    # nothing but the holder's lease, now a tombstone
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(root)) == ["00000001.json"]
