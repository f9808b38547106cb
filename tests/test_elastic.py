"""Topology-free training checkpoints, for real: torchrun on gloo, 1, 2 and 4 CPU ranks, tiny recipe.

A checkpoint holds HF-keyed element ranges (fp32 master weights, Adam moments) per rank, so a run
resumes on another world size (``grad_accum`` adjusted to keep the global batch, in packs), another
``expert_in_one_shard`` or ``shard``/``origin``, and ``moe-train export`` turns it into an HF model in
one process.  Summation order changes with the layout, so losses after the first resumed step are
compared within 2e-3 (fp32 CPU; top-k routing can flip a near-tie token), the first within 1e-6.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import check, cpu_env, moe_train, summary, torchrun
from tests.launch import metrics as read_metrics

pytestmark = pytest.mark.slow

COMMON = ["tiny", "--deepspeed", "deepspeed_zero3", "--cfg-options", "save_total_limit=5"]


def step_dir(work: Path, step: int) -> Path:
    return work / "checkpoints" / f"step-{step:08d}"


def run(tmp: Path, work: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return check(torchrun([*COMMON, "--work-dir", str(work), *args], tmp, nproc=nproc))


def assert_continues(reference: list[float], resumed: list[float], at: int) -> None:
    """``resumed`` are the losses of steps at+1 ...; ``reference`` those of the uninterrupted run from step 1."""
    expected = reference[at : at + len(resumed)]
    assert len(resumed) == len(expected) > 0, (resumed, expected)
    assert abs(resumed[0] - expected[0]) < 1e-6, (resumed, expected)
    assert max(abs(a - b) for a, b in zip(resumed, expected)) < 2e-3, (resumed, expected)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 ranks, grad_accum 1, 9 steps, checkpoints at 3, 6, 9, export."""
    tmp = tmp_path_factory.mktemp("two")
    run(tmp, tmp / "run", "--max-steps", "9", "--save-steps", "3")
    return tmp / "run"


def test_checkpoint_layout_is_safetensors_and_json_with_a_complete_manifest(two_ranks):
    d = step_dir(two_ranks, 3)
    complete = json.loads((d / "COMPLETE").read_text())
    assert complete["world_size"] == 2 and complete["step"] == 3
    on_disk = {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert {
        name: r["size"] for name, r in complete["files"].items()
    } == on_disk  # every file and its size; nothing else
    assert {n for n in on_disk if n.endswith(".safetensors")} == {
        f"{k}-rank{r:05d}-of-00002.safetensors" for k in ("master", "exp_avg", "exp_avg_sq") for r in (0, 1)
    }
    state = json.loads((d / "state.json").read_text())
    assert state["loader"]["step"] == 3 and state["dp_size"] == 2 and state["config"]["model_type"] == "deepseek_v2"
    assert "tokenizer/tokenizer.json" in on_disk
    assert not [p for p in d.rglob("*") if p.suffix in (".pt", ".pkl", ".bin")]


def test_two_to_one_rank(two_ranks, tmp_path):
    """2 ranks x grad_accum 1 -> 1 rank: grad_accum becomes 2 by itself (the global batch is 2 packs)."""
    proc = run(
        tmp_path,
        tmp_path / "one",
        "--max-steps",
        "6",
        "--save-steps",
        "6",
        "--resume",
        str(step_dir(two_ranks, 3)),
        nproc=1,
    )
    assert "re-partitioned from step 3: world size 2 -> 1, grad_accum 1 -> 2; global batch 2 packs" in proc.stdout
    assert_continues(summary(two_ranks)["losses"], summary(tmp_path / "one")["losses"], 3)
    # ... and that 1-rank checkpoint resumes on 2 ranks again (grad_accum back to 1)
    proc = run(tmp_path, tmp_path / "two-again", "--max-steps", "9", "--resume", str(step_dir(tmp_path / "one", 6)))
    assert "world size 1 -> 2, grad_accum 2 -> 1" in proc.stdout
    assert_continues(summary(two_ranks)["losses"], summary(tmp_path / "two-again")["losses"], 6)


def test_two_to_four_ranks_keeps_the_global_batch(tmp_path):
    """2 ranks x grad_accum 2 (4 packs a step; tiny's own grad_accum is 1) -> 4 ranks x grad_accum 1."""
    ref = tmp_path / "ref"
    run(tmp_path, ref, "--max-steps", "5", "--save-steps", "3", "--no-export", "--cfg-options", "grad_accum=2")
    proc = run(
        tmp_path,
        tmp_path / "four",
        "--max-steps",
        "5",
        "--save-steps",
        "0",
        "--no-export",
        "--cfg-options",
        "grad_accum=2",
        "--resume",
        str(step_dir(ref, 3)),
        nproc=4,
    )
    assert "world size 2 -> 4, grad_accum 2 -> 1; global batch 4 packs" in proc.stdout
    assert_continues(summary(ref)["losses"], summary(tmp_path / "four")["losses"], 3)


def test_a_global_batch_that_cannot_be_kept_is_refused_unless_allowed(two_ranks, tmp_path):
    """2 ranks x grad_accum 1 -> 2 ranks x grad_accum 3 would change the batch (the rule 2 -> 3 ranks hits)."""
    work = tmp_path / "w"
    args = [
        "train",
        "tiny",
        "--work-dir",
        str(work),
        "--resume",
        str(step_dir(two_ranks, 3)),
        "--no-export",
        "--cfg-options",
        "grad_accum=3",
        "--max-steps",
        "4",
        "--save-steps",
        "0",
    ]
    proc = moe_train(args, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "global batch is 2 packs" in error[0] and "--allow-batch-change" in error[0], error
    proc = moe_train([*args, "--allow-batch-change"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 2 -> 3 packs per step from step 4 (--allow-batch-change)" in proc.stdout


@pytest.mark.parametrize(
    "layout",
    [["--expert-in-one-shard", "2"], ["--moe-implementation", "origin"]],
    ids=["shard-4-to-2", "shard-to-origin"],
)
def test_expert_layout_change(two_ranks, tmp_path, layout):
    proc = run(
        tmp_path,
        tmp_path / "w",
        "--max-steps",
        "6",
        "--save-steps",
        "6",
        *layout,
        "--resume",
        str(step_dir(two_ranks, 3)),
    )
    assert ("expert_in_one_shard 4 -> 2" if "2" in layout else "moe_implementation shard -> origin") in proc.stdout
    assert_continues(summary(two_ranks)["losses"], summary(tmp_path / "w")["losses"], 3)
    if "origin" in layout:  # and back: origin's checkpoint resumes as shards of all 8 experts
        proc = run(
            tmp_path,
            tmp_path / "back",
            "--max-steps",
            "9",
            "--cfg-options",
            "expert_in_one_shard=None",
            "--resume",
            str(step_dir(tmp_path / "w", 6)),
        )
        assert "moe_implementation origin -> shard, expert_in_one_shard 4 -> None" in proc.stdout
        assert_continues(summary(two_ranks)["losses"], summary(tmp_path / "back")["losses"], 6)


def test_zero2_checkpoint_resumes_under_zero3_on_one_rank(two_ranks, tmp_path):
    """ZeRO-2's fragments are saved by HF key like ZeRO-3's partitions: the stage may change too."""
    z2 = tmp_path / "z2"
    run(tmp_path, z2, "--deepspeed", "deepspeed_zero2", "--max-steps", "3", "--save-steps", "3", "--no-export")
    assert json.loads((step_dir(z2, 3) / "COMPLETE").read_text())["world_size"] == 2
    proc = run(
        tmp_path,
        tmp_path / "z3",
        "--max-steps",
        "6",
        "--save-steps",
        "0",
        "--no-export",
        "--resume",
        str(step_dir(z2, 3)),
        nproc=1,
    )
    assert "deepspeed deepspeed_zero2 -> deepspeed_zero3" in proc.stdout
    ref = summary(two_ranks)["losses"]  # ZeRO-2 and ZeRO-3 agree to summation order (test_train.py)
    assert max(abs(a - b) for a, b in zip(summary(z2)["losses"] + summary(tmp_path / "z3")["losses"], ref)) < 2e-3


def test_changed_settings_are_applied_and_logged_and_fixed_ones_refused(two_ranks, tmp_path):
    work = tmp_path / "w"
    proc = run(
        tmp_path,
        work,
        "--max-steps",
        "4",
        "--save-steps",
        "0",
        "--no-export",
        "--lr",
        "1e-3",
        "--cfg-options",
        "betas=(0.8,0.99)",
        "--resume",
        str(step_dir(two_ranks, 3)),
    )
    assert (
        "lr 0.003 -> 0.001 from step 4" in proc.stdout
        and "betas (0.9, 0.999) -> (0.8, 0.99) from step 4" in proc.stdout
    )
    metrics = [m for m in read_metrics(work) if "loss" in m]
    reference = [m for m in read_metrics(two_ranks) if "loss" in m]
    assert abs(metrics[0]["lr"] - reference[3]["lr"] / 3) < 1e-12  # the schedule continues, scaled by the new peak
    sample = Path(__file__).resolve().parents[1] / "moe_train" / "assets" / "alpaca_sample.jsonl"
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(sample.read_text().splitlines(keepends=True)[:-5]))
    for extra, field in [
        (["--max-length", "128"], "max_length"),
        (["--seed", "1"], "seed"),
        (["--data", str(fewer)], "data"),
    ]:
        proc = moe_train(
            [
                "train",
                "tiny",
                "--work-dir",
                str(tmp_path / field),
                "--resume",
                str(step_dir(two_ranks, 3)),
                "--no-export",
                *extra,
            ],
            tmp_path,
        )
        error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 1 and len(error) == 1 and field in error[0], (field, proc.stderr[-2000:])


def test_export_of_a_two_rank_checkpoint_loads_in_transformers_like_the_runs_own_export(two_ranks, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    proc = moe_train(["export", str(step_dir(two_ranks, 9)), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors.index.json", "COMPLETE", "tokenizer.json"):
        assert (out / name).exists(), name
    own = two_ranks / "hf_model"  # the run exported its final step (9) itself
    shards = sorted(p.name for p in own.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert all((own / s).read_bytes() == (out / s).read_bytes() for s in shards)
    ids = torch.randint(0, 512, (1, 24))
    a = AutoModelForCausalLM.from_pretrained(own, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    proc = moe_train(["export", str(step_dir(two_ranks, 9)), str(tmp_path / "bf16"), "--dtype", "bf16"], tmp_path)
    assert (
        proc.returncode == 0
        and json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    )


def test_export_refuses_incomplete_and_truncated_checkpoints(two_ranks, tmp_path):
    for damage in ("truncated", "incomplete", "missing-rank-file"):
        ckpt = tmp_path / damage
        shutil.copytree(step_dir(two_ranks, 6), ckpt)
        victim = (
            ckpt / "exp_avg-rank00001-of-00002.safetensors"
            if damage != "truncated"
            else ckpt / "master-rank00001-of-00002.safetensors"
        )
        if damage == "truncated":
            victim.write_bytes(victim.read_bytes()[:-100])
        elif damage == "incomplete":
            (ckpt / "COMPLETE").unlink()
        else:
            victim.unlink()
        out = tmp_path / f"out-{damage}"
        proc = moe_train(["export", str(ckpt), str(out)], tmp_path)
        error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 1 and len(error) == 1 and "Traceback" not in proc.stderr, (damage, proc.stderr)
        assert {"truncated": "truncated", "incomplete": "not a complete checkpoint", "missing-rank-file": "missing"}[
            damage
        ] in error[0], error
        assert not (out / "COMPLETE").exists() and not (out / "model.safetensors.index.json").exists()


def test_export_to_s3(two_ranks, tmp_path, s3_server):
    import s3fs

    from moe_train import DeepseekV2ForCausalLM

    url = f"s3://{s3_server['bucket']}/exported"
    env = cpu_env(tmp_path, FSSPEC_S3_ENDPOINT_URL=s3_server["endpoint"])
    proc = subprocess.run(
        [sys.executable, "-m", "moe_train.cli", "export", str(step_dir(two_ranks, 9)), url],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    assert fs.exists(f"{url}/COMPLETE") and fs.exists(f"{url}/tokenizer.json")
    remote = DeepseekV2ForCausalLM.from_pretrained(url, **s3_server["storage_options"])
    local = DeepseekV2ForCausalLM.from_pretrained(str(two_ranks / "hf_model"))
    assert all(torch.equal(a, b) for a, b in zip(remote.state_dict().values(), local.state_dict().values()))
    # A checkpoint on the object store: exported from there, and resumed from there by one process.
    ckpt = f"s3://{s3_server['bucket']}/run/checkpoints/step-00000006"
    fs.put(str(step_dir(two_ranks, 6)), ckpt, recursive=True)
    proc = subprocess.run(
        [sys.executable, "-m", "moe_train.cli", "export", ckpt, str(tmp_path / "from-s3")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_train.cli",
            "train",
            "tiny",
            "--work-dir",
            str(tmp_path / "w"),
            "--resume",
            ckpt,
            "--max-steps",
            "7",
            "--save-steps",
            "0",
            "--no-export",
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpt} at step 6" in proc.stdout
    assert_continues(summary(two_ranks)["losses"], summary(tmp_path / "w")["losses"], 6)


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_planted_as_every_checkpoint_file_runs_nothing(two_ranks, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "work" / "checkpoints" / "step-00000003"
    shutil.copytree(step_dir(two_ranks, 3), evil)
    payload = pickle.dumps(_Payload(marker))
    for f in evil.rglob("*"):
        if f.is_file():
            f.write_bytes(payload)
    for args in (
        ["train", "tiny", "--work-dir", str(tmp_path / "a"), "--resume", str(evil)],
        ["train", "tiny", "--work-dir", str(tmp_path / "work"), "--resume", "auto"],
        ["export", str(evil), str(tmp_path / "out")],
    ):
        proc = moe_train(args, tmp_path)
        error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 1 and len(error) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "nothing in it was run" in error[0] or "verifies" in error[0], error
        assert not marker.exists()
    assert not (tmp_path / "out" / "COMPLETE").exists()


def test_rollback_then_auto_follows_the_new_branch(two_ranks, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(two_ranks / "checkpoints", work / "checkpoints")  # steps 3, 6, 9 of the reference
    proc = run(
        tmp_path,
        work,
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--no-export",
        "--lr",
        "1e-3",
        "--resume",
        str(step_dir(work, 3)),
    )
    assert "newer than the resumed step 3" in proc.stdout
    aside = list((work / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000006", "step-00000009"]
    assert sorted(p.name for p in (work / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
    branch = summary(work)["segment_losses"]
    proc = run(
        tmp_path, work, "--max-steps", "8", "--save-steps", "0", "--no-export", "--lr", "1e-3", "--resume", "auto"
    )
    assert f"resumed from {step_dir(work, 6)} at step 6" in proc.stdout
    assert branch != summary(two_ranks)["losses"][3:6]  # the new branch (another lr), not the abandoned one
    assert len(summary(work)["segment_losses"]) == 2


STALE_LISTING = '''\
"""Test-only (tests/test_elastic.py): rank 1 sees a stale checkpoint listing (the newest step missing)."""
import os

if os.environ.get("RANK") == "1":
    from moe_train.checkpoint import training_state

    _steps = training_state.CheckpointManager._steps
    training_state.CheckpointManager._steps = lambda self: _steps(self)[:-1]
'''


def test_ranks_agree_on_the_resume_point_even_with_a_stale_listing(two_ranks, tmp_path):
    work = tmp_path / "w"
    (work / "checkpoints").mkdir(parents=True)
    for step in (3, 6):
        shutil.copytree(step_dir(two_ranks, step), step_dir(work, step))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALE_LISTING)
    env = cpu_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    proc = check(
        torchrun(
            [
                *COMMON,
                "--work-dir",
                str(work),
                "--max-steps",
                "9",
                "--save-steps",
                "0",
                "--no-export",
                "--resume",
                "auto",
            ],
            tmp_path,
            env=env,
        )
    )
    assert re.search(rf"resumed from {re.escape(str(step_dir(work, 6)))} at step 6", proc.stdout)
    assert summary(work)["losses"] == summary(two_ranks)["losses"][6:9]  # both ranks loaded step 6: exact


def test_auto_falls_back_past_checkpoints_that_fail_verification_on_any_rank(two_ranks, tmp_path):
    """Step 9: 4000 bytes overwritten in rank 1's exp_avg file (same size: only rank 1, reading its own
    ranges, can tell); step 6: a file cut short (found when the resume point is chosen).  Both ranks
    learn of rank 1's finding, both are moved aside, and the run continues from step 3 exactly."""
    work = tmp_path / "w"
    for step in (3, 6, 9):
        shutil.copytree(step_dir(two_ranks, step), step_dir(work, step))
    shard = step_dir(work, 6) / "exp_avg_sq-rank00000-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # COMPLETE still there, the file short
    victim = step_dir(work, 9) / "exp_avg-rank00001-of-00002.safetensors"
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2 // 4 * 4
    data[mid : mid + 4000] = b"\x00\x40\x1c\x46" * 1000  # 1e4 as float32
    victim.write_bytes(bytes(data))
    proc = run(tmp_path, work, "--resume", "auto", "--max-steps", "4", "--save-steps", "0", "--no-export")
    moved = [line for line in proc.stdout.splitlines() if " moved " in line]
    assert len(moved) == 2, proc.stdout
    assert f"moved {step_dir(work, 9)} to " in moved[0] and f"{victim}: the range" in moved[0], moved
    assert f"moved {step_dir(work, 6)} to " in moved[1] and "truncated" in moved[1], moved
    assert f"resumed from {step_dir(work, 3)} at step 3" in proc.stdout
    assert sorted(p.name for p in (work / "checkpoints").glob("damaged-*/*")) == ["step-00000006", "step-00000009"]
    assert summary(work)["segment_losses"] == summary(two_ranks)["losses"][3:4]  # the same topology: exact
