"""No orphans and Ctrl-C (moe_train/engine/distributed.py, preemption.py): real torchrun, 2 ranks on gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import cpu_env, torchrun_cmd
from tests.test_lease import rank_pids

ARGS = ["tiny", "--deepspeed", "deepspeed_zero3"]


def start(tmp: Path, work: Path, *args: str, torchrun_args=()) -> subprocess.Popen:
    cmd = torchrun_cmd([*ARGS, "--work-dir", str(work), *args], torchrun_args=list(torchrun_args))
    with open(tmp / "run.err", "w") as err:  # its own session: a signal to its group is a Ctrl-C in its terminal
        return subprocess.Popen(cmd, env=cpu_env(tmp), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def wait_for_training(proc: subprocess.Popen, tmp: Path, work: Path) -> None:
    deadline = time.monotonic() + 120
    while not any('"loss"' in p.read_text() for p in (work / "metrics").glob("segment-*.jsonl")):  # a step done
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "run.err").read_text()[-3000:]
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigkill_of_torchrun_takes_its_ranks_with_it(tmp_path):
    work = tmp_path / "work"
    proc = start(tmp_path, work, "--max-steps", "100000", "--save-steps", "0")
    try:
        wait_for_training(proc, tmp_path, work)
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        while any(alive(pid) for pid in ranks) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        gone_after = time.monotonic() - t0
    finally:
        proc.kill()
        for pid in rank_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert not any(alive(pid) for pid in ranks), f"ranks {ranks} still running 30 s after torchrun was killed"
    assert gone_after < 5, f"ranks took {gone_after:.1f}s to die"


def test_the_watchdog_ends_a_process_whose_launcher_is_gone(tmp_path):
    """For launchers whose death the kernel does not signal: the parent exits, the child notices."""
    child = (
        "import time; from moe_train.engine.distributed import watch_parent; watch_parent(0.1); "
        "print('watching', flush=True); time.sleep(60)"
    )
    parent = (
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE, "
        "text=True); p.stdout.readline(); print(p.pid, flush=True)"
    )
    # run() returns once the orphan closed the stderr it inherited: that is, once the watchdog ended it.
    out = subprocess.run(
        [sys.executable, "-c", parent, child],
        env=cpu_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    orphan = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(orphan)
    assert "launcher (pid" in out.stderr and "is gone; exiting so no orphan writes into the work dir" in out.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    work = tmp_path / "work"
    proc = start(tmp_path, work, "--max-steps", "100000", "--save-steps", "0", "--no-export")
    try:
        wait_for_training(proc, tmp_path, work)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = (tmp_path / "run.err").read_text()
    assert rc != 0, err[-3000:]
    assert "SIGINT: saving a checkpoint after the current step" in err, err[-3000:]
    saved = sorted(work.glob("checkpoints/step-*/COMPLETE"))
    assert len(saved) == 1, err[-3000:]
    assert f"stop requested at step {int(saved[0].parent.name.split('-')[1])}: checkpoint saved" in err
