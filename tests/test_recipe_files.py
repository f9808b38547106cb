"""Recipe files (YAML), checked by the same table of recipe fields as the built-ins and --cfg-options."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from moe_train.cli import main
from moe_train.recipes import FIELDS, RECIPES, Recipe, dump_recipe, get_recipe, load_recipe
from moe_train.recipes.recipe import optional_type, problem
from tests.launch import check, moe_train


def write(tmp_path, text: str, name: str = "my.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def dumped(builtin: str = "tiny", **changes) -> dict:
    """A built-in's --dump, as the mapping a user edits."""
    values = yaml.safe_load(CliRunner().invoke(main, ["recipes", "--dump", builtin]).output)
    return {**values, **changes}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_dump_round_trip_equals_the_built_in(name, tmp_path):
    out = CliRunner().invoke(main, ["recipes", "--dump", name])
    assert out.exit_code == 0, out.output
    assert load_recipe(write(tmp_path, out.output)) == get_recipe(name)


def test_dump_documents_every_field():
    text = dump_recipe(get_recipe("tiny"))
    for name, f in FIELDS.items():
        assert f"# {f.metadata['help']}\n{name}:" in text


@pytest.mark.slow
def test_a_valid_file_trains_and_is_recorded_in_the_work_dir(tmp_path):
    """`moe-train train FILE.yaml`: the file's values, a YAML 1.2 float (2e-3) and a CLI override on top."""
    recipe = dumped(name="my_tiny", description="tiny, my way", grad_accum=2, save_steps=0)
    text = yaml.safe_dump(recipe, sort_keys=False).replace("lr: 0.003", "lr: 2e-3")
    path = write(tmp_path, text)
    assert load_recipe(path) == get_recipe("tiny").replace(
        name="my_tiny", description="tiny, my way", grad_accum=2, save_steps=0, lr=2e-3
    )
    work = tmp_path / "work"
    check(moe_train(["train", path, "--max-steps", "1", "--no-export", "--work-dir", str(work)], tmp_path))
    stored = json.loads((work / "recipe.json").read_text())
    assert (stored["name"], stored["lr"], stored["grad_accum"], stored["max_steps"]) == ("my_tiny", 2e-3, 2, 1)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"lrr": 0.1}, ["my.yaml: unknown key 'lrr' (did you mean 'lr'?)"]),
        ({"grad_acum": 2}, ["unknown key 'grad_acum' (did you mean 'grad_accum'?)"]),
        ({"lr": "fast"}, ["my.yaml: lr: 'fast' is not a number"]),
        ({"data": [1, 2]}, ["data: [1, 2] is not a list of strings"]),
        ({"varlen": "yes please"}, ["varlen: 'yes please' is not true or false"]),
        ({"betas": [0.9]}, ["betas: (0.9,) is not a list of 2 numbers"]),
        ({"grad_accum": 0}, ["grad_accum: 0 is out of range: it must be >= 1"]),
        ({"eval_fraction": 1.0}, ["eval_fraction: 1.0 is out of range: it must be >= 0 and < 1"]),
        ({"lr": float("nan")}, ["lr: nan is not a finite number"]),
        ({"dtype": "fp16"}, ["dtype: 'fp16' is not one of ['bf16', 'fp32']"]),
    ],
)
def test_bad_files_fail_in_one_line_naming_file_and_key(change, words, tmp_path):
    path = write(tmp_path, yaml.safe_dump(dumped(**change), sort_keys=False))
    out = CliRunner().invoke(main, ["train", path, "--work-dir", str(tmp_path / "work")])
    assert out.exit_code != 0
    errors = [line for line in out.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, out.output
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "work").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "text, words",
    [
        ("name: x\n", ["description missing"]),
        ("- a\n- b\n", ["holds list, not a mapping of recipe fields"]),
        ("name: [x\n", ["my.yaml:2 is not valid YAML"]),
    ],
)
def test_malformed_files(text, words, tmp_path):
    with pytest.raises(ValueError) as e:
        load_recipe(write(tmp_path, text))
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", [n for n in FIELDS if optional_type(n)[0] in (int, float)])
def test_every_numeric_field_refuses_out_of_range_and_non_finite(name):
    """Field by field, from the one table: the bounds are enforced where the recipe is built."""
    meta, (kind, _) = FIELDS[name].metadata, optional_type(name)
    assert problem(name, getattr(get_recipe("tiny"), name)) is None
    if kind is float:
        assert "finite" in problem(name, math.nan) and "finite" in problem(name, math.inf)
    if meta["min"] is not None:
        below = meta["min"] if meta["min_open"] else meta["min"] - (1 if kind is int else 1e-9)
        assert "out of range" in problem(name, kind(below))
        with pytest.raises(ValueError, match=f"recipe tiny: {name}=.* out of range"):
            get_recipe("tiny").replace(**{name: kind(below)})
    if meta["max"] is not None:
        above = meta["max"] if meta["max_open"] else meta["max"] + 1e-9
        assert "out of range" in problem(name, kind(above))


def test_every_field_has_one_help_line():
    for name, f in FIELDS.items():
        assert f.metadata["help"].endswith(".") and "\n" not in f.metadata["help"], name
    assert Recipe.__dataclass_fields__.keys() == FIELDS.keys()


def test_cfg_options_name_the_nearest_key_and_check_the_range(tmp_path):
    out = CliRunner().invoke(main, ["train", "tiny", "--cfg-options", "warmup_ratoi=0.1"])
    assert out.exit_code != 0 and "unknown key 'warmup_ratoi' (did you mean 'warmup_ratio'?)" in out.output
    out = CliRunner().invoke(main, ["train", "tiny", "--cfg-options", "warmup_ratio=-5"])
    assert out.exit_code != 0 and "warmup_ratio=-5 is out of range: it must be >= 0 and < 1" in out.output


def test_plan_takes_a_recipe_file(tmp_path):
    path = write(tmp_path, yaml.safe_dump(dumped("deepseek_v2_lite_chat_full_alpaca_e3", max_length=4096)))
    out = CliRunner().invoke(main, ["plan", path, "--gpus", "8", "--gpu-mem-gb", "80", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["workload"]["max_length"] == 4096
