"""Bad input: a one-line error naming the problem and the fix, a non-zero exit, nothing overwritten.

Every case runs the real CLI in a fresh process next to a work dir that already holds a complete
checkpoint, an HF export and metrics; the bytes of those files must be unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import hf_reference, tiny_config
from tests.launch import moe_train

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[1] / "moe_train" / "assets"


def snapshot(root: Path) -> dict[str, str]:
    """The earlier run's files.  A failed start may have added a complete entry to the tokenized-data
    cache (derived from the inputs, shared by every run of them), never a partial one (checked below)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "data_cache" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A previous run's work dir, a good model dir, and broken inputs."""
    root = tmp_path_factory.mktemp("bad")
    work = root / "work"
    # a partial checkpoint of the earlier run (no COMPLETE): never resumed from, never removed by a failed start
    (work / "checkpoints" / "step-00000003").mkdir(parents=True)
    (work / "checkpoints" / "step-00000003" / "master-rank0-of-1.safetensors").write_bytes(b"x" * 100)
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

    # Validated inputs (tests/test_validation.py has the in-process cases).
    def model_dir(name: str, **config) -> Path:
        path = root / name
        hf_reference(tiny_config(**config)).save_pretrained(path)
        for tok in ("tokenizer.json", "tokenizer_config.json"):
            (path / tok).write_bytes((ASSETS / "tiny_tokenizer" / tok).read_bytes())
        return path

    quoted = model_dir("config_quoted")
    (quoted / "config.json").write_text(
        json.dumps({**json.loads((quoted / "config.json").read_text()), "hidden_size": "64"})
    )
    overlap = model_dir("overlapping_tensors")
    raw = (overlap / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [0, v["data_offsets"][1] - v["data_offsets"][0]]  # every tensor at byte 0
    body = json.dumps(header).encode()
    (overlap / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    outside = model_dir("index_outside")
    (outside / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../../secret.safetensors" for k in header if k != "__metadata__"}})
    )
    model_dir("small_vocab", vocab_size=64)
    (root / "nested.jsonl").write_text('{"instruction": "a", "output": ' + "[" * 50000 + "]" * 50000 + "}\n")
    readonly = root / "readonly"
    readonly.mkdir()
    (root / "a_file").write_text("not a directory")
    return root


# --resume auto: the work dir holds an earlier run, which a run without --resume would refuse first.
TRAIN = ["train", "tiny", "--max-steps", "1", "--no-export", "--resume", "auto"]

# id: (args with {root}/{work} placeholders, words the error must contain)
CASES = {
    # dataset
    "malformed-jsonl-line": (["--data", "{root}/malformed.jsonl"], ["malformed.jsonl:2", "invalid JSON"]),
    "empty-dataset": (["--data", "{root}/empty.jsonl"], ["no samples", "--data"]),
    "record-without-fields": (["--data", "{root}/fields.jsonl"], ["fields.jsonl:1", "instruction"]),
    "data-path-missing": (["--data", "{root}/nope.jsonl"], ["nope.jsonl", "does not exist"]),
    "all-samples-too-long-dropped": (
        ["--max-length", "8", "--cfg-options", "too_long='drop'"],
        ["no trainable samples", "--max-length"],
    ),
    # recipe / config
    "unknown-recipe": (["train", "tinyy"], ["unknown recipe", "deepseek_v2_chat_full_alpaca_e3"]),
    "cfg-option-unknown-key": (["--cfg-options", "lrr=1"], ["lrr=1", "key one of"]),
    "cfg-option-bad-literal": (["--cfg-options", "grad_accum=four"], ["grad_accum", "literal"]),
    "shard-size-not-divisor": (["--expert-in-one-shard", "3"], ["expert_in_one_shard=3", "use one of [1, 2, 4, 8]"]),
    "full-recipe-without-data": (
        [
            "train",
            "deepseek_v2_lite_chat_full_alpaca_e3",
            "--model",
            "{root}/model",
            "--resume",
            "auto",
            "--cfg-options",
            "data=[]",
        ],
        ["has no data", "--data"],
    ),
    # CLI
    "max-length-not-positive": (["--max-length", "0"], ["--max-length", "0"]),
    "lr-not-positive": (["--lr", "-1"], ["--lr", "-1"]),
    "launcher-pytorch-outside-torchrun": (["--launcher", "pytorch"], ["RANK", "torchrun"]),
    "lora-merge-with-ep": (["--lora-rank", "4", "--merge", "--ep", "2"], ["--merge with --ep 2", "--ep 1 --merge"]),
    # storage
    "work-dir-is-a-file": (["--work-dir", "{root}/a_file/sub"], ["not writable", "--work-dir"]),
    "unknown-url-protocol": (["--work-dir", "nosuch://bucket/x"], ["Protocol not known: nosuch", "s3://"]),
    # checkpoints / model
    "model-dir-missing": (["--model", "{root}/no_model"], ["does not exist", "checkpoint"]),
    "model-not-deepseek": (["--model", "{root}/not_deepseek"], ["model_type='llama'", "deepseek_v2"]),
    "model-missing-weight": (
        ["--model", "{root}/missing_key"],
        ["missing model.layers.2.mlp.experts.5.down_proj.weight"],
    ),
    "missing-tokenizer": (
        ["--model", "{root}/model_no_tokenizer", "--cfg-options", "tokenizer=None"],
        ["no tokenizer", "tokenizer.json"],
    ),
    "resume-url-not-a-checkpoint": (["--resume", "{root}/model"], ["not a complete checkpoint", "--resume"]),
    # DeepSpeed config
    "deepspeed-unknown-name": (["--deepspeed", "deepspeed_zero4"], ["deepspeed_zero4", "deepspeed_zero3"]),
    "deepspeed-invalid-json": (["--deepspeed", "{root}/ds_bad.json"], ["ds_bad.json", "JSON"]),
    "deepspeed-bad-stage": (["--deepspeed", "{root}/ds_stage5.json"], ["stage", "5"]),
    "deepspeed-unfillable-auto": (["--deepspeed", "{root}/ds_auto.json"], ["auto", "optimizer.params.lr"]),
    # validated inputs
    "config-field-quoted": (
        ["--model", "{root}/config_quoted"],
        ["config_quoted/config.json: config field hidden_size='64'", "without quotes"],
    ),
    "safetensors-overlap": (
        ["--model", "{root}/overlapping_tensors"],
        ["overlapping_tensors/model.safetensors is not a valid safetensors", "overlapping"],
    ),
    "index-outside-model-dir": (["--model", "{root}/index_outside"], ["outside the checkpoint directory"]),
    "vocab-smaller-than-tokenizer": (["--model", "{root}/small_vocab"], ["vocab_size is 64", "tokenizer"]),
    "data-nested-too-deeply": (["--data", "{root}/nested.jsonl"], ["nested.jsonl:1: JSON nested too deeply"]),
    "work-dir-with-a-run-without-resume": (
        ["train", "tiny", "--max-steps", "1", "--work-dir", "{work}"],
        ["holds an earlier run", "--resume auto", "--overwrite"],
    ),
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
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    assert snapshot(work) == before, "the failing command changed the existing work dir"
    assert not any(p.name.startswith(".write-probe") for p in work.rglob("*"))
    cache = work / "data_cache"
    assert not cache.exists() or all((e / "COMPLETE").exists() for e in cache.iterdir()), list(cache.iterdir())


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
