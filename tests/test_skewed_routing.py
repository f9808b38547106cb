"""ZeRO-3 with skewed routing: a rank that sends no token to some experts must not hang.

Every rank must join the same parameter gathers in the same order.  The shard layout runs every
shard module on every forward; `origin` calls every expert, even with zero tokens.  The control
case skips idle experts, as HF-style per-expert loops do, and must fail: that proves the scenario
really leaves experts idle on one rank.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch import cpu_env, free_port

pytestmark = pytest.mark.slow


def run(layout: str, tmp_path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "tests.skew_worker",
        layout,
    ]
    return subprocess.run(cmd, env=cpu_env(tmp_path), capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("layout", ["shard", "origin"])
def test_skewed_routing_completes(layout, tmp_path):
    proc = run(layout, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("completed") == 2


def test_skipping_idle_experts_fails_instead_of_training(tmp_path):
    proc = run("origin-skip", tmp_path)
    assert proc.returncode != 0
    assert proc.stdout.count("completed") < 2
    # gloo reports the ranks' disagreeing collectives instead of hanging as NCCL would
    assert "mismatch" in proc.stderr or "disagree" in proc.stderr, proc.stderr[-3000:]
