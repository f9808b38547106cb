"""Each record format trains the tiny recipe end to end, and the seed's recipe runs on a local Parquet
copy of its Hub dataset (and stops with one line when the Hub is off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.launch import cpu_env, metrics
from tests.test_data_sources import RECORDS, write_alpaca_parquet

pytestmark = pytest.mark.slow

TOKENIZER = str(Path(__file__).resolve().parents[1] / "moe_train" / "assets" / "tiny_tokenizer")
ONE_STEP = ["--max-steps", "1", "--save-steps", "0", "--no-export"]
# The seed's recipe on the tiny model (its hyper-parameters but a CPU-sized step).
SEED_ON_TINY = [
    "train",
    "deepseek_v2_chat_full_alpaca_e3",
    "--cfg-options",
    "model=None",
    "--cfg-options",
    "model_size='tiny'",
    "--cfg-options",
    f"tokenizer='{TOKENIZER}'",
    "--expert-in-one-shard",
    "4",
    "--max-length",
    "256",
    "--cfg-options",
    "grad_accum=1",
    "--cfg-options",
    "dtype='fp32'",
    "--cfg-options",
    "activation_checkpointing=False",
    *ONE_STEP,
]


def run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_train.cli", *args],
        env=cpu_env(tmp, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def trained(proc: subprocess.CompletedProcess, work: Path) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in metrics(work) if "loss" in m]
    assert len(steps) == 1 and steps[0]["loss"] > 0 and steps[0]["loss_tokens"] > 0
    return steps


def test_sharegpt_messages_text_and_alpaca_parquet_train_together(tmp_path):
    """Four sources, four formats, each detected from its own columns."""
    share = [
        {"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
        for r in RECORDS[:40]
    ]
    chats = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in RECORDS[40:80]
    ]
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    (tmp_path / "chat.json").write_text(json.dumps(chats))
    pq.write_table(pa.table({"text": [r["output"] for r in RECORDS[80:120]]}), tmp_path / "text.parquet")
    alpaca = write_alpaca_parquet(tmp_path / "alpaca.parquet")
    work = tmp_path / "w"
    data = [str(tmp_path / n) for n in ("share.jsonl", "chat.json", "text.parquet")] + [alpaca]
    proc = run(
        ["train", "tiny", "--work-dir", str(work), *ONE_STEP, *[a for d in data for a in ("--data", d)]], tmp_path
    )
    trained(proc, work)
    assert "data cache: tokenized and packed 520 samples" in proc.stdout


def test_mapped_columns_train(tmp_path):
    table = pa.table({"question": [r["instruction"] for r in RECORDS], "answer": [r["output"] for r in RECORDS]})
    pacsv.write_csv(table, tmp_path / "qa.csv")
    work = tmp_path / "w"
    args = ["train", "tiny", "--work-dir", str(work), "--data", str(tmp_path / "qa.csv"), *ONE_STEP]
    proc = run([*args, "--columns", "instruction=question,output=answer", "--data-format", "alpaca"], tmp_path)
    trained(proc, work)
    assert "tokenized and packed 400 samples" in proc.stdout


def test_the_seed_recipe_names_its_hub_dataset_and_trains_on_a_local_copy(tmp_path):
    work = tmp_path / "w"
    proc = run([*SEED_ON_TINY, "--work-dir", str(work)], tmp_path, HF_HUB_OFFLINE="1")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "hf://datasets/tatsu-lab/alpaca" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert "--local-dir DIR" in errors[0] and "pass --data DIR" in errors[0]
    assert not os.path.exists(work / "metrics.jsonl")

    parquet = write_alpaca_parquet(tmp_path / "alpaca.parquet")  # what `hf download tatsu-lab/alpaca` gives
    proc = run([*SEED_ON_TINY, "--work-dir", str(work), "--data", parquet], tmp_path, HF_HUB_OFFLINE="1")
    trained(proc, work)
    assert "chat template: the recipe's template=deepseek_v2" in proc.stdout
    recipe = json.loads((work / "recipe.json").read_text())
    assert recipe["name"] == "deepseek_v2_chat_full_alpaca_e3" and recipe["data"] == [parquet]
