"""`moe-train report`: the run's state from the work dir's records (running, finished, stopped at step N of
M and why, diverged) and resume points on the curves, from records the trainer's own writers produce, and
from a real training process stopped by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from moe_train.engine.lease import Lease
from moe_train.engine.metrics import MetricsWriter
from moe_train.report import load_run, report, resume_points
from moe_train.run_dir import RunDir
from tests.launch import cpu_env

PLANNED = 30


def _segment(root: Path, steps: range, resumed_from: int = 0, total: int = PLANNED, end: dict | None = None):
    """One segment as the trainer writes it: the header with where it stops and where the schedule ends."""
    w = MetricsWriter(
        RunDir(str(root)),
        resumed_from=resumed_from,
        tensorboard=False,
        header={"world_size": 2, "device": "cpu", "total_steps": total, "planned_steps": PLANNED},
    )
    for s in steps:
        w.write({"step": s, "loss": 5.0 - 0.01 * s, "lr": 1e-3, "grad_norm": 1.0, "tgs": 100.0, "tokens": 10})
    if end:
        w.write({"step": steps[-1], **end})
    w.close()


def _summary(root: Path) -> None:
    (root / "summary.json").write_text(json.dumps({"steps": 0}))


def test_finished_only_at_the_last_planned_step(tmp_path):
    _segment(tmp_path, range(1, PLANNED + 1))
    _summary(tmp_path)
    state = load_run(str(tmp_path))["state"]
    assert state == {"state": "finished", "step": PLANNED, "of": PLANNED, "why": "reached the last planned step"}


def test_max_steps_lowered_is_stopped_not_finished(tmp_path):
    _segment(tmp_path, range(1, 11), total=10)  # --max-steps 10 of a 30-step schedule: summary.json written
    _summary(tmp_path)
    state = load_run(str(tmp_path))["state"]
    assert (state["state"], state["step"], state["of"]) == ("stopped", 10, PLANNED)
    assert "max_steps 10" in state["why"]
    out = report(str(tmp_path), str(tmp_path / "out"))
    assert "stopped at step 10 of 30: max_steps 10 (lowered)" in Path(out["report"]).read_text()


def test_a_signal_names_itself_and_a_resume_is_marked(tmp_path):
    _segment(tmp_path, range(1, 9), end={"event": "stopped", "signal": "SIGTERM"})
    state = load_run(str(tmp_path))["state"]
    assert (state["state"], state["step"], state["why"]) == ("stopped", 8, "preempted or cancelled (SIGTERM)")
    # the job is requeued: the next segment resumes from step 8's checkpoint and the stop is history
    _segment(tmp_path, range(9, 16), resumed_from=8)
    run = load_run(str(tmp_path))
    assert resume_points(run) == [8] and run["state"]["step"] == 15
    assert run["state"]["why"].startswith("no summary and no stop record")  # killed: nothing says why
    md = Path(report(str(tmp_path), str(tmp_path / "out"))["report"]).read_text()
    assert "stopped at step 15 of 30: no summary" in md and "Resumed from step 8 (dashed on the curves)" in md


def test_diverged(tmp_path):
    _segment(tmp_path, range(1, 6), end={"event": "diverged", "reason": "loss is nan at step 5"})
    state = load_run(str(tmp_path))["state"]
    assert (state["state"], state["step"], state["why"]) == ("diverged", 5, "loss is nan at step 5")


def test_running_while_the_lease_is_live(tmp_path):
    _segment(tmp_path, range(1, 4))
    lease = Lease(RunDir(str(tmp_path)), heartbeat_s=0.2)
    lease.acquire()
    try:
        assert load_run(str(tmp_path))["state"]["state"] == "running"
    finally:
        lease.release()
    assert load_run(str(tmp_path))["state"]["state"] == "stopped"  # released: no live owner


@pytest.mark.slow  # one real training process: ~20 s
def test_a_real_run_stopped_by_sigterm(tmp_path):
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_train.cli", "train", "tiny", "--launcher", "none", "--work-dir", str(work)]
    cmd += ["--deepspeed", "deepspeed_zero3", "--save-steps", "0", "--max-steps", "80"]
    p = subprocess.Popen(cmd, env=cpu_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            segs = sorted((work / "metrics").glob("segment-*.jsonl")) if (work / "metrics").exists() else []
            if segs and sum(1 for line in segs[-1].read_text().splitlines() if '"loss"' in line) >= 2:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.stdout.read()
        live = load_run(str(work))["state"]
        assert live["state"] == "running" and live["of"] > 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
    finally:
        if p.poll() is None:
            p.kill()
    state = load_run(str(work))["state"]
    assert state["state"] == "stopped" and state["why"] == "preempted or cancelled (SIGTERM)"
    assert 2 <= state["step"] < 80 and state["of"] == live["of"]
    assert fsspec.filesystem("file").exists(str(work / "checkpoints" / f"step-{state['step']:08d}"))
