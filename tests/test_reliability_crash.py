"""Faults injected into real runs: 2 ranks on gloo, ZeRO-3, the tiny recipe, fp32 on CPU.

2. A rank SIGKILLed mid-training; torchrun (--max-restarts 1) restarts both ranks, which resume
   from the newest complete checkpoint.
3. A rank SIGKILLed in the middle of a training checkpoint, then the writer of the HF export
   SIGKILLed after its last tensor, before config, index and COMPLETE.
4. Preemption: SIGTERM to the torchrun agent; on the Slurm dev cluster, `scancel --signal=TERM`
   to the TorchX smoke job (max_retries=1) and `scontrol requeue` of a plain srun job.

Every run is held against one uninterrupted reference run with the same arguments: fp32 on CPU is
deterministic, so every logged loss, before and after a resume, and the exported weights must be
the reference's, bit for bit.

How each kill lands at a known point:
- Mid-training: the test watches the metrics segments and SIGKILLs rank 1 once step KILL_AFTER is logged.
  Which step the kill then hits is up to the machine, so the test reads which checkpoints are
  complete after both old ranks are gone and before the new ones start (nothing writes then), and
  demands that the restart resumes from the newest of those.
- Mid-save: a `sitecustomize` put on the ranks' PYTHONPATH by this test (FREEZE_HOOK below; nothing
  in the product) adds an audit hook that SIGSTOPs one rank at a named file operation: rank 1 when
  it opens its first step-10 file, rank 0 when the exporter opens config.json.  The other
  rank waits for it at a barrier, so nothing moves: the test inspects that exact half-written state,
  the same every time, then SIGKILLs the stopped rank.  Each hook fires once (a marker file).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import CATALOGUE, slurm_cluster, slurm_logs, smoke_on_slurm, torchx, torchx_env

from tests.launch import check, cpu_env, free_port, metrics, summary, torchrun

__all__ = ["slurm_cluster"]  # the fixture, imported for pytest

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 20, 5
ARGS = [
    "tiny",
    "--deepspeed",
    "deepspeed_zero3",
    "--max-steps",
    str(STEPS),
    "--save-steps",
    str(SAVE_EVERY),
    "--resume",
    "auto",
]
KILL_AFTER = 7  # a step between two checkpoints
SHARD = "model-00001-of-00001.safetensors"

FREEZE_HOOK = '''\
"""Test-only (tests/test_reliability_crash.py): stop this rank at a named file operation."""
import json, os, signal, sys

def _install():
    for spec in json.loads(os.environ.get("MOE_TEST_FREEZE", "[]")):
        if os.environ.get("RANK") != str(spec["rank"]):
            continue

        def hook(event, args, spec=spec):
            if (event == spec["event"] and args and isinstance(args[0], (str, bytes, os.PathLike))
                    and os.fsdecode(args[0]) == spec["path"] and not os.path.exists(spec["marker"])):
                with open(spec["marker"], "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)

        sys.addaudithook(hook)

_install()
'''


# ----------------------------------------------------------------------------------------- helpers
def start(
    work: Path,
    tmp: Path,
    name: str,
    torchrun_args=(),
    freeze=(),
    args=ARGS,
    nnodes="1",
    nproc=2,
    endpoint=None,
    launcher="torch.distributed.run",
) -> subprocess.Popen:
    """torchrun in the background (one agent: ``nnodes`` and the rendezvous ``endpoint`` say which job it
    joins); its output goes to tmp/name.out and tmp/name.err."""
    env = cpu_env(tmp)
    if freeze:
        hook_dir = tmp / "freeze_hook"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(FREEZE_HOOK)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(hook_dir), env.get("PYTHONPATH", "")] if p)
        env["MOE_TEST_FREEZE"] = json.dumps(list(freeze))
    cmd = [
        sys.executable,
        "-m",
        launcher,
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint or f'127.0.0.1:{free_port()}'}",
        *torchrun_args,
        "-m",
        "moe_train.cli",
        "train",
        *args,
        "--work-dir",
        str(work),
        "--launcher",
        "pytorch",
    ]
    with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=err)


def logs(tmp: Path, name: str) -> str:
    return (tmp / f"{name}.out").read_text(errors="replace") + (tmp / f"{name}.err").read_text(errors="replace")


def wait_for(what: str, ready, proc: subprocess.Popen, tmp: Path, name: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "timed out" if proc.returncode is None else f"torchrun exited {proc.returncode}"
            proc.kill()
            raise AssertionError(f"{what}: {why}\n{logs(tmp, name)[-6000:]}")
        time.sleep(0.02)


def logged_steps(work: Path) -> list[int]:
    return [m["step"] for m in metrics(work) if "loss" in m]  # a half-written last line is skipped


def complete_steps(work: Path) -> list[int]:
    return sorted(int(d.name.split("-")[1]) for d in (work / "checkpoints").glob("step-*") if (d / "COMPLETE").exists())


def proc_state(pid: int) -> str | None:
    """R, S, T (stopped), Z ... from /proc/PID/stat; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def children(pid: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun agent started."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) != pid:
                continue
            env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if "RANK" in env and proc_state(int(stat.parent.name)) not in (None, "Z"):
            out[int(env["RANK"])] = int(stat.parent.name)
    return out


def stopped(marker: Path) -> int | None:
    """The pid the freeze hook wrote into `marker`, once that process is stopped."""
    pid = marker.read_text() if marker.exists() else ""
    return int(pid) if pid and proc_state(int(pid)) == "T" else None


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = hf_weights(a), hf_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


def losses_by_step(work: Path) -> dict[int, float]:
    """The last logged loss of every step (a step run twice, before and after a crash, counts once)."""
    return {m["step"]: m["loss"] for m in metrics(work) if "loss" in m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one is compared with: 20 steps, checkpoints every 5, export."""
    tmp = tmp_path_factory.mktemp("reference")
    check(torchrun([*ARGS, "--work-dir", str(tmp / "run")], tmp))
    return tmp / "run"


# --------------------------------------------------------------------------- 2. crash and restart
def test_rank_killed_mid_training_is_restarted_and_resumes_exactly(reference, tmp_path):
    work = tmp_path / "run"
    p = start(work, tmp_path, "crash", torchrun_args=["--max-restarts", "1"])
    wait_for(f"step {KILL_AFTER} logged", lambda: KILL_AFTER in logged_steps(work), p, tmp_path, "crash")
    old = children(p.pid)
    assert sorted(old) == [0, 1], old
    os.kill(old[1], signal.SIGKILL)
    killed_after = max(logged_steps(work))
    # Nothing changes on disk between the old workers' end and the new ones' start-up: read it then.
    wait_for(
        "old ranks gone", lambda: all(proc_state(pid) in (None, "Z") for pid in old.values()), p, tmp_path, "crash"
    )
    complete_at_kill = complete_steps(work)
    assert p.wait(timeout=300) == 0, logs(tmp_path, "crash")[-6000:]

    out = logs(tmp_path, "crash")
    assert complete_at_kill and max(complete_at_kill) < STEPS, (complete_at_kill, killed_after)
    resumed = int(re.search(r"resumed from \S+/step-(\d+) at step", out).group(1))
    assert resumed == max(complete_at_kill), (resumed, complete_at_kill)
    # the steps after the checkpoint were trained twice, with the same losses as the reference
    ref = summary(reference)["losses"]
    assert summary(work)["losses"] == ref and summary(work)["segment_losses"] == ref[resumed:]
    ref_loss = losses_by_step(reference)
    records = [(m["step"], m["loss"]) for m in metrics(work) if "loss" in m]
    assert killed_after > resumed
    assert [s for s, _ in records] == list(range(1, STEPS + 1))  # the repeated steps once, from the new segment
    assert all(loss == ref_loss[s] for s, loss in records), (records, ref_loss)
    assert_same_weights(reference / "hf_model", work / "hf_model")


# ------------------------------------------------------------------ 3. crash during save or export
RANK_FILES = [
    "master-rank{:05d}-of-00002.safetensors",
    "exp_avg-rank{:05d}-of-00002.safetensors",
    "exp_avg_sq-rank{:05d}-of-00002.safetensors",
    "rng-rank{:05d}-of-00002.json",
]
RANK0_EXTRA = ["state.json", "tokenizer"]  # rank 0 writes them after its own files


def test_kill_mid_checkpoint_and_mid_export_leave_nothing_marked_complete(reference, tmp_path):
    from moe_train.checkpoint.hf_layout import INDEX, is_complete
    from moe_train.checkpoint.training_state import CheckpointManager
    from moe_train.models.deepseek_v2 import DeepseekV2ForCausalLM
    from moe_train.run_dir import RunDir

    work, hf = tmp_path / "run", tmp_path / "run" / "hf_model"
    step10 = work / "checkpoints" / f"step-{2 * SAVE_EVERY:08d}"
    frozen_save, frozen_export = tmp_path / "frozen-save", tmp_path / "frozen-export"
    p = start(
        work,
        tmp_path,
        "faults",
        torchrun_args=["--max-restarts", "1"],
        freeze=[
            dict(rank=1, event="open", path=str(step10 / RANK_FILES[0].format(1)), marker=str(frozen_save)),
            dict(rank=0, event="open", path=str(hf / "config.json"), marker=str(frozen_export)),
        ],
    )

    # 1. Rank 1 stops as it opens its first step-10 file; rank 0 writes its half of the
    #    checkpoint and waits for rank 1's confirmation (a collective) before COMPLETE.
    pid = wait_for("rank 1 stopped in the step-10 save", lambda: stopped(frozen_save), p, tmp_path, "faults")
    rank0 = [f.format(0) for f in RANK_FILES]
    wait_for(
        "rank 0's half written",
        lambda: all((step10 / f).exists() for f in rank0) and (step10 / "tokenizer" / "tokenizer_config.json").exists(),
        p,
        tmp_path,
        "faults",
    )
    assert sorted(os.listdir(step10)) == sorted(rank0 + RANK0_EXTRA)  # no rank-1 file, no COMPLETE
    assert complete_steps(work) == [SAVE_EVERY]
    assert CheckpointManager(RunDir(str(work)), 0, 2).latest().endswith(f"step-{SAVE_EVERY:08d}")
    os.kill(pid, signal.SIGKILL)

    # 2. torchrun restarts both ranks: the partial step 10 is deleted, training resumes from step 5,
    #    then the export's writer (rank 0) stops after its last tensor, before config, index, COMPLETE.
    pid = wait_for("rank 0 stopped in the export", lambda: stopped(frozen_export), p, tmp_path, "faults")
    assert not is_complete(str(hf)) and not (hf / INDEX).exists() and not (hf / "config.json").exists()
    assert (hf / SHARD).read_bytes() == (reference / "hf_model" / SHARD).read_bytes()  # every tensor is there
    with pytest.raises(FileNotFoundError):
        DeepseekV2ForCausalLM.from_pretrained(str(hf))
    os.kill(pid, signal.SIGKILL)
    assert p.wait(timeout=120) != 0  # the one restart is spent
    out = logs(tmp_path, "faults")
    assert f"removed incomplete checkpoint {step10}" in out
    assert f"resumed from {work / 'checkpoints' / f'step-{SAVE_EVERY:08d}'} at step {SAVE_EVERY}" in out
    assert complete_steps(work) == [3 * SAVE_EVERY, STEPS]  # step 10 saved again, then pruned (keep 2)
    ref_loss = losses_by_step(reference)
    assert all(m["loss"] == ref_loss[m["step"]] for m in metrics(work) if "loss" in m)

    # 3. The next run resumes at step 20 (nothing left to train) and exports over the partial export.
    check(torchrun([*ARGS, "--work-dir", str(work)], tmp_path))
    assert summary(work)["segment_losses"] == [] and is_complete(str(hf))
    assert_same_weights(reference / "hf_model", hf)


# ------------------------------------------------------------------------------------ 4. preemption
def test_sigterm_to_torchrun_checkpoints_the_step_and_the_next_run_resumes(reference, tmp_path):
    work = tmp_path / "run"
    p = start(work, tmp_path, "preempt", args=[*ARGS, "--preempt-grace", "60"])
    wait_for(f"step {KILL_AFTER} logged", lambda: KILL_AFTER in logged_steps(work), p, tmp_path, "preempt")
    p.send_signal(signal.SIGTERM)  # to the agent, which forwards it to both workers
    assert p.wait(timeout=120) != 0  # torchrun dies of the signal (exit 1); its workers exit 143
    out = logs(tmp_path, "preempt")
    stops = re.findall(
        r"moe-train: stop requested at step (\d+): checkpoint saved ([\d.]+)s after the signal, "
        r"within the 60s grace",
        out,
    )
    assert len(stops) == 1, out[-6000:]  # rank 0 says it for the job (the ranks agreed on the step)
    stop_step = int(stops[0][0])
    # the step in flight was finished and checkpointed, and nothing after it ran
    assert logged_steps(work)[-1] == stop_step and complete_steps(work)[-1] == stop_step < STEPS

    out = check(torchrun([*ARGS, "--work-dir", str(work)], tmp_path)).stdout
    assert f"resumed from {work / 'checkpoints' / f'step-{stop_step:08d}'} at step {stop_step}" in out
    assert summary(work)["segment_losses"] == summary(reference)["losses"][stop_step:]
    assert summary(work)["losses"] == summary(reference)["losses"]
    assert_same_weights(reference / "hf_model", work / "hf_model")


def test_grace_overrun_is_reported(capfd):
    from moe_train.engine.preemption import StopFlag

    with StopFlag(grace=0.2) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() and stop.signum == signal.SIGUSR1
        time.sleep(0.5)  # the step in flight and the save take longer than the grace
        message = str(stop.requested(4))
    # said when the grace ran out (the last line of a job the scheduler then kills), and at the end
    assert "the 0.2s grace after SIGUSR1 is over and the checkpoint is not saved yet" in capfd.readouterr().err
    assert "stop requested at step 4" in message and "later than the 0.2s grace" in message


SECOND_SIGNAL = """
import os, signal, sys, time
from moe_train.engine.preemption import REPEAT_S, StopFlag

with StopFlag(grace=30) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # the same request delivered twice (Slurm, then torchrun)
    time.sleep(REPEAT_S + 0.2)
    os.kill(os.getpid(), signal.SIGUSR1)  # a different signal is no repeat
    print("still running", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the same signal again, later: the sender insists
    time.sleep(60)
print("not reached", flush=True)
"""


def test_second_signal_exits_at_once():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60)
    assert p.returncode == 143, p.stderr
    assert p.stdout == "still running\n" and time.monotonic() - t0 < 30
    assert "SIGTERM: saving a checkpoint after the current step" in p.stderr
    assert "second SIGTERM: exiting now without a checkpoint" in p.stderr


class SlurmJob:
    """A job on the dev cluster, watched through squeue (while queued) and sacct (every run of it)."""

    def __init__(self, job: str, env: dict, log_dir: Path, timeout: float = 300) -> None:
        self.id, self.env, self.log_dir = job, env, log_dir
        self.deadline = time.monotonic() + timeout

    def state(self) -> str:
        """PENDING, RUNNING, ... or '' once the job has left the queue."""
        return subprocess.run(
            ["squeue", "-h", "-j", self.id, "-o", "%T"], env=self.env, capture_output=True, text=True
        ).stdout.strip()

    def sacct(self) -> list[dict]:
        """Every run (-D: a requeued job's earlier runs too) and its steps."""
        out = subprocess.run(
            ["sacct", "-D", "-j", self.id, "--parsable2", "-o", "JobID,State,ExitCode,DerivedExitCode,Start,End"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        return [dict(zip(out[0].split("|"), line.split("|"))) for line in out[1:]]

    def wait(self, what: str, ready) -> None:
        while not ready():
            assert time.monotonic() < self.deadline, f"{what}: {self.sacct()}\n{slurm_logs(self.log_dir)[-6000:]}"
            time.sleep(0.1)

    def stop_and_requeue(self, work: Path, stop) -> tuple[str, float]:
        """Call `stop` once the job logged 2 steps, then wait for the requeued run to finish.

        Returns the first run's logs (the second run's srun truncates the log files) and how long the
        requeued job waited before it ran again.
        """
        self.wait("2 steps logged", lambda: len(logged_steps(work)) >= 2 or not self.state())
        assert self.state() == "RUNNING", slurm_logs(self.log_dir)[-6000:]
        stop()
        self.wait("the job requeued", lambda: self.state() == "PENDING")
        requeued_at = time.monotonic()
        first_run = slurm_logs(self.log_dir)
        self.wait("the requeued run started", lambda: self.state() != "PENDING")
        waited = time.monotonic() - requeued_at
        self.wait(
            "the requeued run done",
            lambda: (
                not self.state()
                and any(r["JobID"] == self.id and r["State"] not in ("REQUEUED", "RUNNING") for r in self.sacct())
            ),
        )
        return first_run, waited

    def runs(self) -> list[dict]:
        return [r for r in self.sacct() if r["JobID"] == self.id]


def assert_resumed_like_the_reference(reference: Path, work: Path, logs_: str) -> int:
    """The second run resumed from the stop checkpoint; every step's loss and the export are the reference's."""
    stop_step = int(re.search(r"resumed from \S+/step-(\d+) at step \d+", logs_).group(1))
    assert f"resumed from {work / 'checkpoints' / f'step-{stop_step:08d}'} at step {stop_step}" in logs_
    records = [(m["step"], m["loss"]) for m in metrics(work) if "loss" in m]
    ref_loss = losses_by_step(reference)
    assert [s for s, _ in records] == list(range(1, STEPS + 1)), records  # nothing lost, nothing run twice
    assert all(loss == ref_loss[s] for s, loss in records), (records, ref_loss)
    assert_same_weights(reference / "hf_model", work / "hf_model")
    return stop_step


def slurm_env(tmp: Path, cluster: dict) -> dict:
    # a JIT build killed half-way leaves a lock that hangs the next run: one extensions dir per test
    return torchx_env(
        TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"),
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        **cluster,
    )


@pytest.mark.xdist_group("slurm")  # the one Slurm dev cluster (tests/slurm_cluster.py)
def test_scancel_term_on_slurm_saves_and_torchx_requeues(slurm_cluster, reference, tmp_path):
    """The smoke component (TorchX, torchrun) on one node with 2 ranks and max_retries=1.

    `scancel --signal=TERM` signals every process of the step: torchrun, which dies of it (exit 1) after
    forwarding it, and both ranks, which save and exit 143.  srun fails, TorchX's batch script requeues
    the job, and the second run resumes.  (One node: a multi-node job is heterogeneous, and Slurm starts
    a requeued heterogeneous job only at its next backfill pass that follows some job or node change.)
    """
    env = slurm_env(tmp_path, slurm_cluster)
    work = tmp_path / "work"
    p = torchx(
        "run",
        "-s",
        "slurm",
        f"{CATALOGUE}:smoke",
        "-j",
        "1x2",
        "--work_dir",
        str(work),
        "--max_retries",
        "1",
        "--",
        "--max-steps",
        str(STEPS),
        "--save-steps",
        "0",
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    job = SlurmJob(re.search(r"^slurm://[^/]+/(\d+)$", p.stdout, re.M).group(1), env, tmp_path)
    first_run, waited = job.stop_and_requeue(
        work, lambda: subprocess.run(["scancel", "--signal=TERM", job.id], env=env, check=True)
    )

    assert [r["State"] for r in job.runs()] == ["REQUEUED", "COMPLETED"], job.sacct()
    stops = re.findall(
        r"moe-train: stop requested at step (\d+): checkpoint saved [\d.]+s after the signal, "
        r"within the 30s grace",
        first_run,
    )
    assert len(stops) == 1, first_run[-6000:]  # rank 0 says it for the job (the ranks agreed on the step)
    assert assert_resumed_like_the_reference(reference, work, first_run + slurm_logs(tmp_path)) == int(stops[0])
    print(f"TorchX job {job.id}: {job.sacct()}; requeued job waited {waited:.1f}s")


SBATCH = """#!/bin/bash
#SBATCH --requeue --open-mode=append --output={log} --nodes=1 --ntasks=2 --cpus-per-task=1 --mem=6G
srun moe-train train tiny --launcher slurm --deepspeed deepspeed_zero3 --work-dir {work} --max-steps {steps} \\
    --save-steps 0 --resume auto --preempt-grace 5
"""


@pytest.mark.xdist_group("slurm")  # the one Slurm dev cluster (tests/slurm_cluster.py)
def test_slurm_requeue_of_srun_ranks_saves_within_killwait_and_exits_143(slurm_cluster, reference, tmp_path):
    """`scontrol requeue` does what Slurm does to a job preempted with PreemptMode=REQUEUE: SIGTERM to
    every process, SIGKILL KillWait (5 s on the dev cluster) later, then the job pends again.  The ranks
    are started by srun itself (--launcher slurm), so Slurm records the trainer's own exit code."""
    env = slurm_env(tmp_path, slurm_cluster)
    work, log = tmp_path / "work", tmp_path / "slurm-job.out"
    script = tmp_path / "job.sh"
    script.write_text(SBATCH.format(log=log, work=work, steps=STEPS))
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    job = SlurmJob(job_id, env, tmp_path)
    _, waited = job.stop_and_requeue(work, lambda: subprocess.run(["scontrol", "requeue", job.id], env=env, check=True))

    runs = job.runs()
    assert [r["State"] for r in runs] == ["REQUEUED", "COMPLETED"], job.sacct()
    # DerivedExitCode: the highest exit code of the job's steps (sacct shows the step's own as "15:0")
    assert "143:0" in [r["DerivedExitCode"] for r in runs], job.sacct()
    logs_ = log.read_text(errors="replace")  # a killed job's log may end mid-character
    # srun reports both tasks at once ("tasks 0-1") or each as it exits ("task 0", "task 1")
    exited = re.findall(r"srun: error: node\d: tasks? ([\d-]+): Exited with exit code 143", logs_)
    assert sorted(exited) in (["0-1"], ["0", "1"]), logs_[-6000:]
    assert "SIGTERM: saving a checkpoint after the current step, within the 5s grace" in logs_
    assert_resumed_like_the_reference(reference, work, logs_)
    print(f"sbatch job {job.id}: {job.sacct()}; requeued job waited {waited:.1f}s")


@pytest.mark.xdist_group("slurm")  # the one Slurm dev cluster (tests/slurm_cluster.py)
def test_sbatch_signal_warns_before_the_time_limit_the_job_saves_and_requeues(slurm_cluster, tmp_path):
    """The documented pre-timeout warning: `SBATCH_SIGNAL=USR1@60` exported before `torchx run` (sbatch reads it;
    TorchX 0.7's Slurm run options have no signal option), a 2-minute time limit, `--max_retries 1`.  Slurm
    sends SIGUSR1 to the step about a minute before the limit; the launcher gives the ranks the whole lead
    (torchrun's shutdown timeout), they save and exit; the batch script requeues the job, whose second run
    resumes from that checkpoint (the test cancels it then)."""
    env = {**slurm_env(tmp_path, slurm_cluster), "SBATCH_SIGNAL": "USR1@60"}
    work = tmp_path / "work"
    p = torchx(
        "run", "-s", "slurm", "-cfg", "time=2", f"{CATALOGUE}:smoke", "-j", "1x2", "--work_dir", str(work),
        "--max_retries", "1", "--", "--max-steps", "100000", "--epochs", "1000", "--save-steps", "0",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    job = SlurmJob(re.search(r"^slurm://[^/]+/(\d+)$", p.stdout, re.M).group(1), env, tmp_path, timeout=400)
    job.wait("the job requeued", lambda: any(r["State"] == "REQUEUED" for r in job.runs()))
    first_run = slurm_logs(tmp_path)  # before the second run's srun truncates the logs
    stop = re.search(r"moe-train: stop requested at step (\d+): checkpoint saved [\d.]+s after the signal", first_run)
    assert stop and "SIGUSR1: saving a checkpoint" in first_run, first_run[-6000:]
    saved = work / "checkpoints" / f"step-{int(stop.group(1)):08d}"
    assert (saved / "COMPLETE").is_file()
    job.wait("the second run resumed", lambda: f"resumed from {saved} at step {stop.group(1)}" in slurm_logs(tmp_path))
    subprocess.run(["scancel", job.id], env=env, check=True)
    assert job.runs()[0]["State"] == "REQUEUED", job.sacct()


# ------------------------------------------------------------------------------- 5. resized jobs
def assert_resized_continuation(reference: Path, work: Path, out: str, old: int, new: int) -> int:
    """Steps 1..STEPS logged once each: up to the resumed checkpoint the reference's, bit for bit; after it,
    on ``new`` ranks with grad_accum 2/new (the same global batch), the first within 1e-6 and the rest within
    2e-3 (another summation order).  The export loads in transformers.  Returns the step resumed at."""
    from transformers import AutoModelForCausalLM

    resumed = int(re.search(r"resumed from \S+/step-(\d+) at step", out).group(1))
    assert (
        f"re-partitioned from step {resumed}: world size {old} -> {new}, grad_accum {2 // old} -> {2 // new}; "
        "global batch 2 packs"
    ) in out, out[-6000:]
    records = [(m["step"], m["loss"]) for m in metrics(work) if "loss" in m]
    assert [s for s, _ in records] == list(range(1, STEPS + 1)), records
    ref = losses_by_step(reference)
    assert all(loss == ref[s] for s, loss in records if s <= resumed), (records, ref)
    after = [(loss, ref[s]) for s, loss in records if s > resumed]
    assert after and abs(after[0][0] - after[0][1]) < 1e-6, after
    assert max(abs(a - b) for a, b in after) < 2e-3, after
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    logits = [AutoModelForCausalLM.from_pretrained(d / "hf_model").eval()(ids).logits for d in (work, reference)]
    assert torch.isfinite(logits[0]).all() and (logits[0] - logits[1]).abs().max() < 1e-2
    return resumed


LAUNCHER = "moe_train.engine.torchrun"


def test_elastic_torchrun_loses_an_agent_and_continues_on_the_rest(reference, tmp_path):
    """Two torchrun agents (``--nnodes 1:2``, one rank each) on one c10d rendezvous; SIGKILL of one agent
    mid-run (its rank follows it: PR_SET_PDEATHSIG).  The other agent's rank fails in its next collective,
    the agent restarts it (``--max-restarts 1``), the rendezvous closes with the one node left, and
    ``--resume auto`` continues from the last checkpoint on 1 rank, grad_accum 1 -> 2."""
    work, port = tmp_path / "run", free_port()
    conf = "last_call_timeout=5"  # how long a new round waits for more agents once it has the minimum

    def agent(name: str, is_host: int) -> subprocess.Popen:
        rdzv = ["--rdzv-id=elastic-test", f"--rdzv-conf=is_host={is_host},{conf}", "--max-restarts=1"]
        # as the TorchX components launch a multi-node job: moe-train-torchrun, the store outliving the agents
        return start(work, tmp_path, name, rdzv, nnodes="1:2", nproc=1, endpoint=f"127.0.0.1:{port}", launcher=LAUNCHER)

    survivor = agent("survivor", 1)
    lost = agent("lost", 0)
    try:
        wait_for(f"step {KILL_AFTER} logged", lambda: KILL_AFTER in logged_steps(work), survivor, tmp_path, "survivor")
        lost.kill()
        assert lost.wait(timeout=30) == -signal.SIGKILL
        assert survivor.wait(timeout=300) == 0, logs(tmp_path, "survivor")[-6000:]
    finally:
        for p in (survivor, lost):
            if p.poll() is None:
                p.kill()
    out = logs(tmp_path, "survivor")
    assert "1 agent(s) did not finish" in out  # the store host waited for the lost agent, then gave up on it
    assert "recvVector failed" not in out
    resumed = assert_resized_continuation(reference, work, out, old=2, new=1)
    assert SAVE_EVERY <= resumed < STEPS
    assert segment_worlds(work) == [(0, 2), (resumed, 1)]


def segment_worlds(work: Path) -> list[tuple[int, int]]:
    """(step resumed from, world size) of each segment of the run, from the metrics' segment headers."""
    heads = [json.loads(f.read_text().splitlines()[0]) for f in sorted((work / "metrics").glob("segment-*.jsonl"))]
    return [(h["resumed_from"], h["world_size"]) for h in heads]


@pytest.mark.xdist_group("slurm")  # the one Slurm dev cluster (tests/slurm_cluster.py)
def test_slurm_resubmission_at_another_size_resumes_on_the_same_work_dir(slurm_cluster, reference, tmp_path):
    """A requeue keeps the node count (and torchx 0.7.0's Slurm scheduler ignores min_replicas), so a
    resize is a new submission on the same work dir: the smoke component at ``-j 2x1`` (two nodes, one
    rank each) stops at step 10, then at ``-j 1x1`` with the component's ``resume=auto`` it continues on
    one rank, grad_accum 1 -> 2, to step 20."""
    env = slurm_env(tmp_path, slurm_cluster)
    work = tmp_path / "work"

    def submit(j: str, steps: int, name: str) -> str:
        log_dir = tmp_path / name
        log_dir.mkdir()
        trainer = ["--", "--max-steps", str(steps), "--save-steps", str(SAVE_EVERY)]
        p = smoke_on_slurm("--deepspeed", "deepspeed_zero3", *trainer, work_dir=work, cwd=log_dir, env=env, j=j)
        out = p.stdout + p.stderr + slurm_logs(log_dir)
        assert p.returncode == 0 and "Job finished: SUCCEEDED" in p.stderr, out[-6000:]
        return out

    submit("2x1", STEPS // 2, "first")
    assert segment_worlds(work) == [(0, 2)] and complete_steps(work)[-1] == STEPS // 2
    out = submit("1x1", STEPS, "second")
    assert f"max_steps 10 -> {STEPS} from step 11" in out
    assert assert_resized_continuation(reference, work, out, old=2, new=1) == STEPS // 2
    assert segment_worlds(work) == [(0, 2), (STEPS // 2, 1)]
