"""The run directory object owns the work dir's paths: resolved once, and no other module joins them."""

from __future__ import annotations

import ast
import posixpath
from pathlib import Path

from moe_train.recipes import get_recipe, recipe_record
from moe_train.run_dir import RUN_FILES, RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "moe_train"
PATHS = ("checkpoints", "metrics", "legacy_metrics", "tb", "recipe", "deepspeed", "summary", "hf_model", "lease")
PATHS += ("data_cache", "previous", "tracking", "wandb", "hf_adapter")


def test_every_path_is_a_distinct_entry_of_the_work_dir():
    run = RunDir("memory://runs/a/")
    paths = [getattr(run, name) for name in PATHS]
    assert run.url == "memory://runs/a" and run.root == "/runs/a"
    assert all(posixpath.dirname(p) == run.root for p in paths) and len(set(paths)) == len(paths)
    # an earlier run is recognised by the entries a run writes
    assert {posixpath.basename(p) for p in paths} >= set(RUN_FILES)
    assert run.hf_model_url == "memory://runs/a/hf_model"
    assert run.hf_adapter_url == "memory://runs/a/hf_adapter"


def test_no_other_module_joins_a_path_of_the_work_dir():
    """A work-dir entry's name appears in a ``posixpath.join`` only in moe_train/run_dir.py."""
    run = RunDir("memory://x")
    names = {posixpath.basename(getattr(run, name)) for name in PATHS}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "run_dir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "posixpath.join":
                found += [
                    f"{path.relative_to(PACKAGE)}:{node.lineno}: {a.value}"
                    for a in node.args
                    if isinstance(a, ast.Constant) and a.value in names
                ]
    assert not found, found


def test_recipe_record_redacts_every_url_field():
    secret = "s3://AKIA:s3cr3t@bucket/x.jsonl"
    r = get_recipe("tiny").replace(data=[secret], eval_data=[secret], model=secret, model_size=None)
    record = recipe_record(r)
    assert "s3cr3t" not in repr(record) and record["eval_data"] == ["s3://***@bucket/x.jsonl"]
    assert record["betas"] == [0.9, 0.999]  # JSON types: what a checkpoint's state.json reads back
