"""moe-train-torchrun: the rendezvous store outlives every agent of a multi-node job.

The race it closes is forced here, not waited for: a sitecustomize hook makes the non-host agent
close the rendezvous 3 s after torchrun's exit barrier.  Under plain torchrun the host has exited
by then and the late agent prints the store's C++ trace; under moe-train-torchrun both finish clean.
The workers are ``true``: the race is in the agents, not in training."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import cpu_env, free_port

LATE_CLOSE_HOOK = '''\
"""Test-only (tests/test_torchrun_store.py): this torchrun agent closes its rendezvous late."""
import os, time

def _install():
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr
    close = dr.DynamicRendezvousHandler.shutdown
    def late(self):
        time.sleep(float(os.environ["MOE_TEST_LATE_CLOSE_S"]))
        return close(self)
    dr.DynamicRendezvousHandler.shutdown = late

if os.environ.get("MOE_TEST_LATE_CLOSE_S"):
    _install()
'''
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WRAPPER = [sys.executable, "-m", "moe_train.engine.torchrun"]
TRACE = ("recvVector failed", "failed to shutdown the rendezvous", "Exception raised from")


def agents(tmp: Path, launcher: list[str], late_close_s: float = 3.0, workers: str = "true"):
    """Two agents (--nnodes 2, one worker each) on one c10d rendezvous; the non-host closes late.
    Returns [(returncode, output, seconds)] for the host, then the other."""
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(LATE_CLOSE_HOOK)
    port, procs = free_port(), []
    start = time.monotonic()
    for is_host in (1, 0):
        env = cpu_env(tmp, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
        if not is_host:
            env["MOE_TEST_LATE_CLOSE_S"] = str(late_close_s)
        cmd = [
            *launcher,
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-id=store-{tmp.name}",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-conf",
            f"is_host={is_host}",
            "--no-python",
            workers,
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        results.append((p.returncode, out, time.monotonic() - start))
    return results


def test_plain_torchrun_shows_the_race_that_the_hook_forces(tmp_path):
    """The fault injection is real: plain torchrun's host leaves while the other agent still closes."""
    (host_rc, _, _), (other_rc, other, _) = agents(tmp_path, TORCHRUN)
    assert host_rc == 0 and other_rc == 0  # the job succeeded either way...
    assert "failed to shutdown the rendezvous" in other, other[-3000:]  # ...and still printed the trace


def test_the_store_stays_up_until_every_agent_has_closed_the_rendezvous(tmp_path):
    (host_rc, host, host_s), (other_rc, other, other_s) = agents(tmp_path, WRAPPER)
    assert host_rc == 0 and other_rc == 0, host[-3000:] + other[-3000:]
    for out in (host, other):
        assert not [t for t in TRACE if t in out], out[-3000:]
    assert host_s >= other_s - 0.5  # the host waited for the late agent rather than the other way round
    assert host_s - other_s < 15, "counted out promptly after the late agent, not by the 30 s timeout"


def test_a_failed_job_exits_non_zero_with_one_line_per_node(tmp_path):
    """Workers that fail without a word (`false`): each node's launcher ends with one line naming its rank,
    instead of torchrun's ChildFailedError report and traceback."""
    (host_rc, host, _), (other_rc, other, _) = agents(tmp_path, WRAPPER, late_close_s=0, workers="false")
    assert host_rc == 1 and other_rc == 1
    for out in (host, other):
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: rank ") and "exited with code 1 without a message" in lines[-1], out
        assert "Traceback" not in out and "ChildFailedError" not in out and "recvVector failed" not in out


# the second is what the TorchX components run on one node
ONE_NODE = ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--rdzv-conf=is_host=1"]


@pytest.mark.parametrize("argv", [["--standalone"], ONE_NODE], ids=["standalone", "component"])
def test_single_node_is_plain_torchrun(tmp_path, argv):
    p = subprocess.run(
        [*WRAPPER, *argv, "--nproc-per-node=1", "--no-python", "true"],
        env=cpu_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
