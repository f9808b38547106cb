"""Divergence stops the run (moe_train/engine/divergence.py): the guard's rules, then a real `--lr 1e6` run."""

from __future__ import annotations

import json
import math

import pytest

from moe_train.engine.divergence import NONFINITE_STEPS, Diverged, DivergenceGuard, finite_or_none
from tests.launch import torchrun
from tests.test_lease import error_line


def test_a_non_finite_loss_stops_at_once():
    with pytest.raises(Diverged, match=r"^training diverged at step 3: loss nan; lower --lr"):
        DivergenceGuard().check(3, math.nan, 1.0, 0)


def test_only_a_streak_of_non_finite_steps_stops_the_run():
    guard = DivergenceGuard(skipped_steps=7)
    assert guard.check(1, 2.0, 1.0, 7) is None and guard.healthy
    assert guard.check(2, 2.0, math.inf, 7) == f"step 2: grad norm inf (1 of {NONFINITE_STEPS} in a row stop the run)"
    assert not guard.healthy
    assert guard.check(3, 2.0, 1.0, 8).startswith("step 3: step skipped by DeepSpeed (overflow) (2 of")
    assert guard.check(4, 2.0, 1.0, 8) is None and guard.healthy  # a good step ends the streak
    for step in range(5, 5 + NONFINITE_STEPS - 1):
        guard.check(step, 2.0, math.nan, 8)
    with pytest.raises(Diverged, match=rf"at step {4 + NONFINITE_STEPS}: grad norm nan, {NONFINITE_STEPS} non-finite"):
        guard.check(4 + NONFINITE_STEPS, 2.0, math.nan, 8)


def test_records_stay_standard_json():
    record = finite_or_none({"loss": math.inf, "grad_norm": math.nan, "load": [{"max": -math.inf}], "step": 3})
    assert (
        json.dumps(record, allow_nan=False) == '{"loss": null, "grad_norm": null, "load": [{"max": null}], "step": 3}'
    )


def strict_json(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in {line}"))


@pytest.mark.slow
def test_lr_1e6_stops_non_zero_keeps_the_last_good_checkpoint_and_exports_nothing(tmp_path):
    work = tmp_path / "work"
    proc = torchrun(
        [
            "tiny",
            "--deepspeed",
            "deepspeed_zero3",
            "--work-dir",
            str(work),
            "--max-steps",
            "30",
            "--save-steps",
            "1",
            "--lr",
            "1e6",
        ],
        tmp_path,
    )
    line = error_line(proc)
    assert (
        line.startswith("Error: training diverged at step ") and f"{NONFINITE_STEPS} non-finite steps in a row" in line
    )
    records = [
        strict_json(x)
        for p in sorted((work / "metrics").glob("segment-*.jsonl"))
        for x in p.read_text().splitlines()
        if json.loads(x).get("event") != "segment"
    ]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["grad_norm"] is not None and all(r["grad_norm"] is None for r in steps[1:])
    assert records[-1]["event"] == "diverged" and len(steps) == 1 + NONFINITE_STEPS
    # Step 1 was the last finite one: its checkpoint is kept, none was written during the streak.
    assert sorted(p.name for p in (work / "checkpoints").glob("step-*")) == ["step-00000001"]
    assert (work / "checkpoints" / "step-00000001" / "COMPLETE").exists()
    assert not (work / "hf_model").exists() and not (work / "summary.json").exists()
