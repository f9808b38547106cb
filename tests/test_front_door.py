"""The seed's launch forms as users type them, and the one line a failure ends with.

- The env form: ``NPROC_PER_NODE=2 moe-train train tiny --deepspeed deepspeed_zero3 --launcher pytorch`` starts
  torchrun itself, on one node and on two "nodes" of this machine (two invocations, ``NNODES=2 NODE_RANK=0|1``).
- Bad inputs through the env form and a TorchX local_cwd component: one ``Error:`` line naming the rank, the
  last line of the launcher, and no ``Traceback`` anywhere.  Under plain torchrun the rank's line appears once.
- No run ends without its state: the last step is saved; ``--resume auto`` on a finished run without a
  checkpoint refuses in one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import BIN, COMPONENTS

from tests.conftest import hf_reference, tiny_config
from tests.launch import check, cpu_env, free_port, metrics, torchrun

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[1] / "moe_train" / "assets"
MOE_TRAIN = str(BIN / "moe-train")


def env_form(args: list[str], tmp: Path, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """``moe-train train ARGS --launcher pytorch`` with the env form's variables, started, not waited for."""
    return subprocess.Popen(
        [MOE_TRAIN, "train", *args, "--launcher", "pytorch"],
        env=cpu_env(tmp, **{"NPROC_PER_NODE": "2", **env}),
        cwd=cwd or tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_env_form_trains_on_one_node_and_saves_the_last_step(tmp_path):
    work = tmp_path / "work"
    p = check(
        finish(
            env_form(
                [
                    "tiny",
                    "--deepspeed",
                    "deepspeed_zero3",
                    "--work-dir",
                    str(work),
                    "--max-steps",
                    "4",
                    "--save-steps",
                    "3",
                ],
                tmp_path,
            )
        )
    )
    header = json.loads((work / "metrics" / "segment-0001.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2, header
    assert [m["step"] for m in metrics(work) if "loss" in m] == [1, 2, 3, 4]
    # step 3 by --save-steps, step 4 because it is the last: the export is never newer than a checkpoint
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    assert (work / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    assert json.loads((work / "hf_model" / "COMPLETE").read_text())["step"] == 4
    assert "Traceback" not in p.stdout + p.stderr


def test_env_form_two_nodes_on_this_machine(tmp_path):
    """XTuner's multi-node form, both "nodes" here: NNODES=2 NODE_RANK=0|1 ADDR PORT, one rank each."""
    work, port = tmp_path / "work", str(free_port())
    args = ["tiny", "--work-dir", str(work), "--max-steps", "2", "--save-steps", "0", "--no-export"]
    common = dict(NPROC_PER_NODE="1", NNODES="2", ADDR="127.0.0.1", PORT=port)
    nodes = [env_form(args, tmp_path, **common, NODE_RANK=str(i)) for i in (0, 1)]
    for p in [finish(n) for n in nodes]:
        check(p)
        assert "Traceback" not in p.stdout + p.stderr and "recvVector" not in p.stderr, p.stderr[-3000:]
    header = json.loads((work / "metrics" / "segment-0001.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2
    assert [m["step"] for m in metrics(work) if "loss" in m] == [1, 2]


def test_env_form_nodes_that_do_not_share_the_work_dir_are_refused(tmp_path):
    """A relative --work-dir from two different directories: each node would write its own "run"."""
    port = str(free_port())
    common = dict(NPROC_PER_NODE="1", NNODES="2", ADDR="127.0.0.1", PORT=port)
    nodes = []
    for i in (0, 1):
        (tmp_path / f"node{i}").mkdir()
        nodes.append(
            env_form(
                ["tiny", "--work-dir", "run", "--max-steps", "1"],
                tmp_path,
                cwd=tmp_path / f"node{i}",
                **common,
                NODE_RANK=str(i),
            )
        )
    for i, p in enumerate(finish(n) for n in nodes):
        assert p.returncode == 1
        assert re.fullmatch(
            rf"Error: rank {i}: work dir run is not the same directory on every node: .*", last_line(p.stderr)
        ), p.stderr[-2000:]
        assert "Traceback" not in p.stdout + p.stderr
    assert not any((tmp_path / f"node{i}" / "run" / "metrics").exists() for i in (0, 1))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("front_door")
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    model = root / "model"  # every tensor of the safetensors header claims byte 0
    hf_reference(tiny_config()).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((ASSETS / "tiny_tokenizer" / name).read_bytes())
    raw = (model / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [0, v["data_offsets"][1] - v["data_offsets"][0]]
    body = json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    for name in ("reused", "leased"):
        (root / name).mkdir()
    (root / "reused" / "summary.json").write_text('{"steps": 3}')
    lease = root / "leased" / "lease"
    lease.mkdir()
    (lease / "00000001.json").write_text(
        json.dumps(
            {
                "job": "slurm:4242",
                "host": os.uname().nodename,
                "pid": os.getpid(),  # alive: this test process
                "round": 0,
                "pidns": os.readlink("/proc/self/ns/pid"),
            }
        )
    )
    return root


# id: (trainer args, the line's text after "Error: rank N: ")
BAD = {
    "ep-degree": (["--ep", "3"], r"--ep 3 does not divide the world size 2; use one of \[1, 2\]"),
    "bad-data": (["--data", "{root}/bad.jsonl"], r".*bad\.jsonl:2: invalid JSON .*; fix or remove that line"),
    "bad-safetensors": (["--model", "{root}/model"], r".*model\.safetensors is not a valid safetensors file .*"),
    "reused-work-dir": (["--work-dir", "{root}/reused"], r"work dir .*reused holds an earlier run .*--overwrite.*"),
    "live-lease": (["--work-dir", "{root}/leased"], r"work dir .*leased is in use by job slurm:4242 .*"),
}


def test_env_form_bad_inputs_end_on_one_error_line(bad, tmp_path):
    procs = {}
    for case, (args, _) in BAD.items():
        args = [a.format(root=bad) for a in args]
        if "--work-dir" not in args:
            args += ["--work-dir", str(tmp_path / case)]
        procs[case] = env_form(["tiny", "--max-steps", "1", *args], tmp_path)
    for case, proc in procs.items():
        p = finish(proc)
        out = p.stdout + p.stderr
        assert p.returncode == 1, (case, out[-3000:])
        assert re.fullmatch(rf"Error: rank [01]: {BAD[case][1]}", last_line(p.stderr)), (case, p.stderr[-3000:])
        assert len(re.findall(r"^Error:", out, re.M)) == 1, (case, out[-3000:])
        assert "Traceback" not in out, (case, out[-3000:])
    assert not (bad / "reused" / "metrics").exists() and (bad / "leased" / "lease" / "00000001.json").exists()


def test_local_cwd_component_bad_input_is_one_error_line(bad, tmp_path):
    """Under TorchX (one node, two ranks): one Error: line in the replica's output, TorchX's own status block
    after it carries the same message, no traceback anywhere."""
    p = subprocess.run(
        [
            str(BIN / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "-cfg",
            f"log_dir={tmp_path / 'logs'}",
            "components.py:smoke",
            "-j",
            "1x2",
            "--work_dir",
            str(tmp_path / "work"),
            "--",
            "--data",
            str(bad / "bad.jsonl"),
        ],
        cwd=COMPONENTS,
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_env(tmp_path, PATH=f"{BIN}:{os.environ['PATH']}"),
    )
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    errors = re.findall(r"^trainer/\d (Error: .*)$", out, re.M)
    assert len(errors) == 1 and re.fullmatch(rf"Error: rank [01]: {BAD['bad-data'][1]}", errors[0]), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    status = " ".join(out.split("structured_error_msg", 1)[1].split())  # TorchX's YAML folds long lines
    assert "bad.jsonl:2: invalid JSON" in status, status


def test_plain_torchrun_says_the_line_once(tmp_path):
    """Plain torchrun keeps its own report; the ranks' common Error: line is printed by one rank only."""
    p = torchrun(["tiny", "--ep", "3", "--work-dir", str(tmp_path / "w")], tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert len(re.findall(r"^Error: .*--ep 3 does not divide the world size 2", out, re.M)) == 1, out[-4000:]


def test_resume_auto_refuses_a_finished_run_without_checkpoint(tmp_path):
    from tests.launch import moe_train

    work = tmp_path / "work"
    check(
        moe_train(
            ["train", "tiny", "--max-steps", "2", "--save-steps", "0", "--no-export", "--work-dir", str(work)], tmp_path
        )
    )
    assert not (work / "checkpoints").exists() or not any((work / "checkpoints").iterdir())

    def run_files() -> list[Path]:  # the lease moves on a generation (a tombstone) with every start
        return sorted(p.relative_to(work) for p in work.rglob("*") if "lease" not in p.parts)

    before = run_files()
    p = moe_train(["train", "tiny", "--max-steps", "4", "--resume", "auto", "--work-dir", str(work)], tmp_path)
    assert p.returncode == 1
    assert re.fullmatch(
        r"Error: work dir .*work holds a run that ended at step 2 \(summary\.json\) but no training checkpoint to "
        r"resume from \(it ran with --save-steps 0\?\); pass --overwrite to start again .*",
        last_line(p.stderr),
    ), p.stderr[-2000:]
    assert run_files() == before


def test_a_run_killed_before_its_first_save_starts_afresh(tmp_path):
    """No summary.json (the run never ended): --resume auto starts from scratch, so a requeue does not crash-loop."""
    from moe_train.engine.setup import refuse_finished_without_checkpoint
    from moe_train.run_dir import RunDir

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "segment-0001.jsonl").write_text('{"event": "segment"}\n{"step": 1, "loss": 6.0}\n')
    refuse_finished_without_checkpoint(RunDir(str(tmp_path)))
    (tmp_path / "summary.json").write_text('{"steps": 1}')
    with pytest.raises(ValueError, match="ended at step 1"):
        refuse_finished_without_checkpoint(RunDir(str(tmp_path)))


KILLED_WRITING = """
import json, os, signal, sys
from moe_train.engine import errors

def dump(obj, f):  # write half of the record, then die as torchrun's SIGKILL would have it
    f.write(json.dumps(obj)[:20])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

errors.json.dump = dump
errors.write_error_file("the line", "expected")
"""


def test_a_rank_killed_while_writing_its_error_file_leaves_none(tmp_path):
    """torchrun's agent parses a failed rank's error file: a half-written one crashed it (JSONDecodeError)."""
    path = tmp_path / "error.json"
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(path)}
    p = subprocess.run([sys.executable, "-c", KILLED_WRITING], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    assert not path.exists()  # only the partial temporary file, which the agent never reads
    (left,) = tmp_path.iterdir()
    assert re.fullmatch(r"error\.json\.\d+\.tmp", left.name) and left.read_text() != ""
