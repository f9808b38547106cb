"""Input from a tired operator or an attacker, refused in one line before anything changes: every recipe
value typed and ranged from the one table of fields (recipes/recipe.py), fuzzed through ``--cfg-options``
and the CLI flags; no code run from a tokenizer directory; ``--overwrite`` moving nothing until every input
is checked; a FIFO as data; a garbage metrics line."""

from __future__ import annotations

import json
import math
import os
import pty
import select
import shutil
import subprocess
import sys
import threading
import typing
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_train.cli import TRAIN_FIELDS, train, train_recipe
from moe_train.data.sources import DataError, resolve_sources
from moe_train.engine.metrics import read_metrics
from moe_train.recipes.options import parse_assignment
from moe_train.recipes.recipe import FIELDS, optional_type, problem
from moe_train.run_dir import RunDir
from tests.launch import cpu_env, moe_train

ASSETS = Path(__file__).resolve().parents[1] / "moe_train" / "assets"


def recipe_of(args: list[str]):
    """The recipe `moe-train train ARGS` would run, built by the CLI's own code, starting nothing."""
    ctx = train.make_context("train", list(args))
    params = dict(ctx.params)
    name, cfg_options = params.pop("recipe_name"), params.pop("cfg_options")
    return train_recipe(name, {k: params[k] for k in TRAIN_FIELDS}, cfg_options)


# ------------------------------------------------------------------ one table: every numeric field, both doors
def _numeric_fields() -> list[str]:
    out = []
    for name in FIELDS:
        kind, _ = optional_type(name)
        if kind in (int, float) or typing.get_origin(kind) is tuple:
            out.append(name)
    return out


def _bad_numbers(name: str) -> list[float]:
    """Non-finite values, and a value just past each bound of the field's range."""
    meta, kind = FIELDS[name].metadata, optional_type(name)[0]
    bad = [math.nan, math.inf, -math.inf] if kind is not int else []
    step = 1 if kind is int else 1e-9
    if meta["min"] is not None:
        bad.append(meta["min"] if meta["min_open"] else meta["min"] - step)
    if meta["max"] is not None:
        bad.append(meta["max"] if meta["max_open"] else meta["max"] + step)
    return bad


@pytest.mark.parametrize("name", _numeric_fields())
def test_every_numeric_field_refuses_non_finite_and_out_of_range_values(name):
    kind = optional_type(name)[0]
    pair = typing.get_origin(kind) is tuple
    for x in _bad_numbers(name):
        text = repr(float(x)) if isinstance(x, float) else str(x)
        literal = f"float('{text}')" if not math.isfinite(x) else text
        assert problem(name, (x, 0.5) if pair else x) is not None
        with pytest.raises(click.BadParameter, match=rf"--cfg-options.*|{name}"):
            parse_assignment(f"{name}=({literal}, 0.5)" if pair else f"{name}={text}")
        if name in TRAIN_FIELDS:  # the option of its own: the same range
            with pytest.raises(click.BadParameter):
                recipe_of(["tiny", f"--{name.replace('_', '-')}", text])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cfg-options", "betas=abc"], "is not a Python literal for betas"),
        (["--cfg-options", "betas=(0.9,)"], "is not a list of 2 numbers"),
        (["--cfg-options", "betas=(0.9, 'x')"], "is not a list of 2 numbers"),
        (["--cfg-options", "warmup_ratio=-5"], "out of range"),
        (["--cfg-options", "max_grad_norm=-1"], "out of range"),
        (["--cfg-options", "eval_steps=-3"], "out of range"),
        (["--cfg-options", "epochs=0"], "out of range"),
        (["--cfg-options", "lr=nan"], "is not a Python literal"),
        (["--data", ""], "data=[''] is empty (an unset shell variable?)"),
        (["--cfg-options", "data=['x.jsonl', '']"], "is empty"),
        (["--model", ""], "model='' is empty"),
        (["--lr", "nan"], "'nan' is not a finite number"),
        (["--preempt-grace", "nan"], "'nan' is not a finite number"),
        (["--peak-tflops", "inf"], "'inf' is not a finite number"),
        (["--eval-fraction", "inf"], "not in the range"),
    ],
)
def test_the_issues_examples_are_one_line_errors(args, message):
    with pytest.raises(click.UsageError) as e:
        recipe_of(["tiny", *args])
    assert message in e.value.format_message() and "\n" not in e.value.format_message()


def test_a_string_where_a_list_of_paths_is_expected_is_one_path():
    assert recipe_of(["tiny", "--cfg-options", "data=/x.jsonl"]).data == ["/x.jsonl"]
    assert recipe_of(["tiny", "--cfg-options", "eval_data='s3://b/x.jsonl'"]).eval_data == ["s3://b/x.jsonl"]
    assert recipe_of(["tiny", "--cfg-options", "betas=[0.8, 0.9]"]).betas == (0.8, 0.9)


# ------------------------------------------------------------------ fuzzing: zero tracebacks
_KEYS = sorted(set(FIELDS) - {"name"})
_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-1", "0", "1e309", "()", "(1,)", "(0.9, 0.99)", "[]", "['']", "''", "None"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats().map(repr),
    st.lists(st.floats(allow_nan=True) | st.integers(), max_size=3).map(lambda v: repr(tuple(v))),
)
_FLAGS = [p.opts[0] for p in train.params if isinstance(p, click.Option) and not p.is_flag and p.name != "cfg_options"]


def _holds(args: list[str]) -> None:
    """Either a recipe whose every field passes the table's check, or a one-line usage error."""
    try:
        recipe = recipe_of(args)
    except click.ClickException as e:
        assert e.format_message().strip() and "Traceback" not in e.format_message()
        return
    assert all(problem(name, getattr(recipe, name)) is None for name in FIELDS)


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(_KEYS), value=_VALUES)
def test_fuzzed_cfg_options_give_a_checked_recipe_or_one_line(key, value):
    _holds(["tiny", "--cfg-options", f"{key}={value}"])


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(flag=st.sampled_from(_FLAGS), value=_VALUES)
def test_fuzzed_cli_flags_give_a_checked_recipe_or_one_line(flag, value):
    _holds(["tiny", flag, value])


# ------------------------------------------------------------------ data that is not a file, metrics lines
def test_a_fifo_as_data_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    box: list[BaseException] = []
    worker = threading.Thread(target=lambda: box.append(pytest.raises(DataError, resolve_sources, [str(fifo)])))
    worker.daemon = True
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "reading the FIFO blocked"
    assert "is not a regular file or directory (a FIFO or device?)" in str(box[0].value)


def test_a_garbage_metrics_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, capsys):
    run = RunDir(str(tmp_path))
    (tmp_path / "metrics").mkdir()
    lines = ['{"event": "segment", "segment": 1, "resumed_from": 0}', '{"step": 1, "loss": 2.0}', "\x00garbage{", "[1]"]
    lines += ['{"step": 2, "loss": 1.5}', '{"step": 3, "lo']  # the last: half written, skipped silently
    (tmp_path / "metrics" / "segment-0001.jsonl").write_text("\n".join(lines))
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    warned = capsys.readouterr().err.splitlines()
    where = f"{tmp_path}/metrics/segment-0001.jsonl"
    assert warned == [
        f"Warning: {where}:3 is not a JSON record; skipped",
        f"Warning: {where}:4 is not a JSON record; skipped",
    ]


# ------------------------------------------------------------------ real starts that must change nothing
def test_overwrite_with_a_typo_in_the_data_moves_nothing(tmp_path):
    work = tmp_path / "work"
    (work / "checkpoints" / "step-00000004").mkdir(parents=True)
    (work / "checkpoints" / "step-00000004" / "COMPLETE").write_text("{}")
    (work / "metrics").mkdir()
    (work / "metrics" / "segment-0001.jsonl").write_text('{"step": 4}\n')
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    proc = moe_train(
        ["train", "tiny", "--work-dir", str(work), "--overwrite", "--data", str(tmp_path / "typo.jsonl")], tmp_path
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"Error: {tmp_path}/typo.jsonl does not exist; check the path or URL given to --data"
    )
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if "lease" not in p.parts) == before
    assert not (work / "previous").exists()


def _evil_tokenizer(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny tokenizer with an ``auto_map`` whose module, if ever imported, leaves a marker file."""
    tok, marker = tmp_path / "tok", tmp_path / "code-ran"
    shutil.copytree(ASSETS / "tiny_tokenizer", tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return tok, marker


def test_a_tokenizer_that_needs_its_own_code_is_refused_under_a_tty_with_yes_typed(tmp_path):
    tok, marker = _evil_tokenizer(tmp_path)
    args = ["train", "tiny", "--tokenizer", str(tok), "--work-dir", str(tmp_path / "w"), "--max-steps", "1"]
    leader, follower = pty.openpty()
    os.write(leader, b"y\ny\ny\n")  # typed ahead, for transformers' "Do you wish to run the custom code?"
    env = cpu_env(tmp_path, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_train.cli", *args], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 1
    text = out.decode(errors="replace")
    assert not marker.exists() and not (tmp_path / "modules").exists()
    assert f"Error: {tok}/tokenizer_config.json asks to run Python code from its directory (auto_map)" in text, text[
        -3000:
    ]
    assert "Traceback" not in text
