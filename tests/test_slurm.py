"""Real runs: TorchX jobs on the two-node Slurm dev cluster, and the smoke component end to end.

The cluster (schedulers/slurm/devcluster.py) is installed with apt-get and started once per session;
these tests skip only on a machine that cannot install it, and fail instead under CI=true.
"""

import json
import re
import subprocess
import time

import pytest
from slurm_cluster import (
    CATALOGUE,
    free_port,
    slurm_cluster,
    slurm_logs,
    smoke_on_slurm,
    torchx,
    torchx_env,
    trainer_ready,
)

__all__ = ["slurm_cluster"]  # the fixture, imported for pytest

# One Slurm dev cluster per test session: under pytest-xdist every test that uses it runs on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

trainer_missing = pytest.mark.skipif(
    not trainer_ready(), reason="the trainer has not landed yet (moe-train / moe_train.engine.train)"
)


def _job_id(stdout: str) -> str:
    return re.search(r"^slurm://[^/]+/(\d+)$", stdout, re.M).group(1)


def _het_nodes(job_id: str, env: dict, components: int = 2) -> list:
    """The node of each heterogeneous component of `job_id`, in component order."""
    deadline = time.monotonic() + 30  # slurmdbd records the components a moment after the job ends
    while True:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-n", "--parsable2", "-o", "JobID,NodeList"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = dict(line.split("|") for line in out.splitlines())
        nodes = [rows[k] for k in sorted(k for k in rows if re.fullmatch(rf"{job_id}\+\d+", k))]
        if len(nodes) == components or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def test_torchx_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    env = torchx_env(**slurm_cluster)
    p = torchx("run", "-s", "slurm", "--wait", "utils.sh", "--num_replicas", "2", "hostname", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout + p.stderr + slurm_logs(tmp_path)
    assert "Job finished: SUCCEEDED" in p.stderr
    assert _het_nodes(_job_id(p.stdout), env) == ["node1", "node2"]


def test_component_rendezvous_across_nodes(slurm_cluster, tmp_path):
    """The smoke component's torchrun command, with a stand-in trainer that reports its rank."""
    stub = tmp_path / "bin" / "moe-train"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "rank=$RANK world=$WORLD_SIZE node=$SLURMD_NODENAME args=$*"\n')
    stub.chmod(0o755)
    env = torchx_env(PATH_PREPEND=str(stub.parent), **slurm_cluster)
    p = smoke_on_slurm(work_dir=tmp_path / "work", cwd=tmp_path, env=env, timeout=120)
    logs = slurm_logs(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr + logs
    ranks = sorted(re.findall(r"rank=(\d) world=(\d) node=(node\d) args=train tiny --launcher pytorch", logs))
    assert [(r, w) for r, w, _ in ranks] == [("0", "2"), ("1", "2")], logs
    assert {n for _, _, n in ranks} == {"node1", "node2"}
    assert _het_nodes(_job_id(p.stdout), env) == ["node1", "node2"]


def _assert_hf_checkpoint(work_dir):
    from transformers import AutoModelForCausalLM

    hf_model = work_dir / "hf_model"
    assert (hf_model / "config.json").is_file(), f"no HF checkpoint under {work_dir}"
    model = AutoModelForCausalLM.from_pretrained(hf_model)
    assert sum(p.numel() for p in model.parameters()) > 0


def _trainer_env(tmp_path, **extra) -> dict:
    # a JIT build killed half-way leaves a lock that hangs the next run: one extensions dir per test
    return torchx_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), TOKENIZERS_PARALLELISM="false", **extra)


@trainer_missing
def test_smoke_on_slurm(slurm_cluster, tmp_path):
    env = _trainer_env(tmp_path, **slurm_cluster)
    work_dir = tmp_path / "work"
    p = smoke_on_slurm(work_dir=work_dir, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout + p.stderr + slurm_logs(tmp_path)
    assert "Job finished: SUCCEEDED" in p.stderr
    _assert_hf_checkpoint(work_dir)


@trainer_missing
def test_smoke_on_local_cwd(tmp_path):
    work_dir = tmp_path / "work"
    p = torchx(
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / 'logs'}",
        f"{CATALOGUE}:smoke",
        "--work_dir",
        str(work_dir),
        "--rdzv_port",
        str(free_port()),
        cwd=tmp_path,
        env=_trainer_env(tmp_path),
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    _assert_hf_checkpoint(work_dir)


@trainer_missing
def test_srun_two_nodes_one_task_each(slurm_cluster, tmp_path):
    """The seed's srun form across nodes: `srun -N 2 --ntasks-per-node 1 moe-train train ... --launcher slurm`,
    ranks started by srun itself on node1 and node2 (rank 0's host is the first of the step's node list)."""
    env = _trainer_env(tmp_path, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **slurm_cluster)
    work = tmp_path / "work"
    p = subprocess.run(
        ["srun", "-N", "2", "--ntasks-per-node", "1", "--mem=3G", "bash", "-c",
         f"echo node=$SLURMD_NODENAME rank=$SLURM_PROCID; exec moe-train train tiny --deepspeed deepspeed_zero3 "
         f"--launcher slurm --work-dir {work} --max-steps 3"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(re.findall(r"node=(node\d) rank=(\d)", p.stdout)) == [("node1", "0"), ("node2", "1")], p.stdout
    header = json.loads((work / "metrics" / "segment-0001.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2
    _assert_hf_checkpoint(work)
