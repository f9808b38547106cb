"""Bad input: a one-line error naming the problem and the fix, a non-zero exit, nothing overwritten.

Every case runs the real CLI in a fresh process next to a work dir that already holds a complete
checkpoint, an HF export and metrics; the bytes of those files must be unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import hf_reference, tiny_config
from tests.launch import moe_train

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[1] / "moe_train" / "assets"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A previous run's work dir, a good model dir, and broken inputs."""
    root = tmp_path_factory.mktemp("bad")
    work = root / "work"
    (work / "checkpoints" / "step-00000003").mkdir(parents=True)
    (work / "checkpoints" / "step-00000003" / "COMPLETE").write_text('{"step": 3}')
    (work / "checkpoints" / "step-00000003" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (work / "hf_model").mkdir()
    (work / "hf_model" / "COMPLETE").write_text("{}")
    (work / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')

    model = root / "model"
    hf_reference(tiny_config()).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((ASSETS / "tiny_tokenizer" / name).read_bytes())

    no_tok = root / "model_no_tokenizer"
    hf_reference(tiny_config()).save_pretrained(no_tok)

    not_ds = root / "not_deepseek"
    not_ds.mkdir()
    (not_ds / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))

    missing = root / "missing_key"
    hf_reference(tiny_config()).save_pretrained(missing)
    from safetensors.torch import load_file, save_file

    t = load_file(missing / "model.safetensors")
    del t["model.layers.2.mlp.experts.5.down_proj.weight"]
    save_file(t, missing / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (missing / name).write_bytes((ASSETS / "tiny_tokenizer" / name).read_bytes())

    (root / "malformed.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    (root / "empty.jsonl").write_text("")
    (root / "fields.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (root / "ds_bad.json").write_text('{"zero_optimization": {"stage": 3,}')
    (root / "ds_stage5.json").write_text('{"zero_optimization": {"stage": 5}}')
    (root / "ds_auto.json").write_text('{"zero_optimization": {"stage": 3}, "optimizer": {"params": {"lr": "auto"}}}')
    readonly = root / "readonly"
    readonly.mkdir()
    (root / "a_file").write_text("not a directory")
    return root


TRAIN = ["train", "tiny", "--max-steps", "1", "--no-export"]

# id: (args with {root}/{work} placeholders, words the error must contain)
CASES = {
    # dataset
    "malformed-jsonl-line": (["--data", "{root}/malformed.jsonl"], ["malformed.jsonl:2", "invalid JSON"]),
    "empty-dataset": (["--data", "{root}/empty.jsonl"], ["no samples", "--data"]),
    "record-without-fields": (["--data", "{root}/fields.jsonl"], ["fields.jsonl:1", "instruction"]),
    "data-path-missing": (["--data", "{root}/nope.jsonl"], ["nope.jsonl", "does not exist"]),
    "all-samples-too-long-dropped": (["--max-length", "8", "--cfg-options", "too_long='drop'"],
                                     ["no trainable samples", "--max-length"]),
    # recipe / config
    "unknown-recipe": (["train", "tinyy"], ["unknown recipe", "deepseek_v2_chat_full_alpaca_e3"]),
    "cfg-option-unknown-key": (["--cfg-options", "lrr=1"], ["lrr=1", "key one of"]),
    "cfg-option-bad-literal": (["--cfg-options", "grad_accum=four"], ["grad_accum", "literal"]),
    "shard-size-not-divisor": (["--expert-in-one-shard", "3"], ["expert_in_one_shard=3", "use one of [1, 2, 4, 8]"]),
    "full-recipe-without-data": (["train", "deepseek_v2_lite_chat_full_alpaca_e3", "--model", "{root}/model"],
                                 ["has no data", "--data"]),
    # CLI
    "max-length-not-positive": (["--max-length", "0"], ["--max-length", "0"]),
    "lr-not-positive": (["--lr", "-1"], ["--lr", "-1"]),
    "launcher-pytorch-outside-torchrun": (["--launcher", "pytorch"], ["RANK", "torchrun"]),
    # storage
    "work-dir-is-a-file": (["--work-dir", "{root}/a_file/sub"], ["not writable", "--work-dir"]),
    "unknown-url-protocol": (["--work-dir", "nosuch://bucket/x"], ["Protocol not known: nosuch", "s3://"]),
    # checkpoints / model
    "model-dir-missing": (["--model", "{root}/no_model"], ["does not exist", "checkpoint"]),
    "model-not-deepseek": (["--model", "{root}/not_deepseek"], ["model_type='llama'", "deepseek_v2"]),
    "model-missing-weight": (["--model", "{root}/missing_key"], ["missing model.layers.2.mlp.experts.5.down_proj.weight"]),
    "missing-tokenizer": (["--model", "{root}/model_no_tokenizer", "--cfg-options", "tokenizer=None"],
                          ["no tokenizer", "tokenizer.json"]),
    "resume-url-not-a-checkpoint": (["--resume", "{root}/model"], ["not a complete checkpoint", "--resume"]),
    # DeepSpeed config
    "deepspeed-unknown-name": (["--deepspeed", "deepspeed_zero4"], ["deepspeed_zero4", "deepspeed_zero3"]),
    "deepspeed-invalid-json": (["--deepspeed", "{root}/ds_bad.json"], ["ds_bad.json", "JSON"]),
    "deepspeed-bad-stage": (["--deepspeed", "{root}/ds_stage5.json"], ["stage", "5"]),
    "deepspeed-unfillable-auto": (["--deepspeed", "{root}/ds_auto.json"], ["auto", "optimizer.params.lr"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world):
    args, words = CASES[case]
    work = world / "work"
    before = snapshot(work)
    args = [a.format(root=world, work=work) for a in args]
    cmd = args if args[0] == "train" else TRAIN + args
    if "--work-dir" not in cmd:
        cmd = cmd + ["--work-dir", str(work)]
    proc = moe_train(cmd, world)
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("Error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    assert snapshot(work) == before, "the failing command changed the existing work dir"
    assert not any(p.name.startswith(".write-probe") for p in work.rglob("*"))


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
