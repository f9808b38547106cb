"""The CLI surface and every shipped recipe."""

from __future__ import annotations

import typing

import click
import pytest
from click.testing import CliRunner

from moe_train.cli import TRAIN_FIELDS, main, train
from moe_train.data.templates import TEMPLATES
from moe_train.engine.deepspeed_config import load_deepspeed_config
from moe_train.models.common.experts import MOE_IMPLEMENTATIONS
from moe_train.plan import model_config, model_layout
from moe_train.recipes import FIELDS, RECIPES, get_recipe
from moe_train.recipes.options import FiniteRange, parse_assignment
from moe_train.recipes.recipe import optional_type


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_complete_and_consistent(name):
    r = get_recipe(name)
    cfg = model_config(r)  # named size or known HF id
    layout = model_layout(r, cfg)  # the recipe's expert layout, validated against the model
    assert cfg.num_experts % layout.shard_size(cfg.num_experts) == 0
    assert load_deepspeed_config(r.deepspeed)["zero_optimization"]["stage"] in (2, 3)
    assert (
        (r.template is None or r.template in TEMPLATES)
        and r.too_long in ("truncate", "drop")
        and r.dtype in ("bf16", "fp32")
    )
    assert r.max_length >= 2 and r.grad_accum >= 1 and 0 <= r.warmup_ratio < 1 and r.lr > 0
    assert r.description


def test_seed_recipe_matches_the_xtuner_one():
    r = get_recipe("deepseek_v2_chat_full_alpaca_e3")
    assert (r.moe_implementation, r.expert_in_one_shard, r.lr, r.betas, r.weight_decay) == (
        "shard",
        10,
        1e-5,
        (0.9, 0.999),
        0.0,
    )
    assert (r.max_grad_norm, r.epochs, r.dtype, r.save_steps, r.save_total_limit) == (1.0, 3, "bf16", 50, 2)
    assert get_recipe("deepseek_v2_lite_chat_full_alpaca_e3").expert_in_one_shard == 8
    assert get_recipe("deepseek_v2_chat_full_alpaca_e3_32k_varlen").max_length == 32768


def test_recipes_command_lists_every_recipe_once():
    out = CliRunner().invoke(main, ["recipes"])
    assert out.exit_code == 0
    names = [line.split()[0] for line in out.output.splitlines()]
    assert names == sorted(RECIPES)


def test_train_cli_surface_is_pinned():
    """New options are a decision: update this list on purpose."""
    assert sorted(o for p in train.params for o in p.opts + p.secondary_opts) == sorted(
        [
            "recipe_name",
            "--deepspeed",
            "--launcher",
            "--work-dir",
            "--model",
            "--data",
            "--data-format",
            "--columns",
            "--template",
            "--data-cache",
            "--max-length",
            "--varlen",
            "--no-varlen",
            "--sp",
            "--ep",
            "--hold-experts",
            "--no-hold-experts",
            "--moe-implementation",
            "--expert-in-one-shard",
            "--max-steps",
            "--epochs",
            "--lr",
            "--seed",
            "--save-steps",
            "--resume",
            "--overwrite",
            "--peak-tflops",
            "--report-to",
            "--cfg-options",
            "--no-export",
            "--preempt-grace",
            "--debug",
            "--require-fast-kernels",
            "--allow-slow-kernels",
            "--eval-data",
            "--eval-fraction",
            "--eval-steps",
            "--tokenizer",
            "--allow-batch-change",
            "--lora-rank",
            "--lora-alpha",
            "--lora-dropout",
            "--lora-targets",
            "--merge",
        ]
    )
    assert all(p.help for p in train.params if isinstance(p, click.Option))


# train options that are not recipe fields: how and where the job runs
_RUN_OPTIONS = {
    "recipe_name",
    "launcher",
    "work_dir",
    "resume",
    "peak_tflops",
    "cfg_options",
    "no_export",
    "preempt_grace",
    "overwrite",
    "debug",
    "allow_batch_change",
    "data_cache",
    "merge",
}


def check_field_option(param: click.Parameter) -> None:
    """An option named after a recipe field is that field: flag, type, range or choices, default, help."""
    meta, (kind, _) = FIELDS[param.name].metadata, optional_type(param.name)
    flag = "--" + param.name.replace("_", "-")
    assert param.opts == [flag] and param.default is None, param.name  # None: the recipe's value
    assert param.help.startswith(meta["help"]), param.name
    if kind is bool:
        assert param.is_flag and param.secondary_opts == ["--" + (meta["off_flag"] or "no-" + flag[2:])]
        return
    if typing.get_origin(kind) is list and meta["choices"] is not None:  # names, comma separated
        assert not param.multiple and tuple(param.type.choices) == meta["choices"], param.name
        assert param.type.convert(",".join(meta["choices"]), param, None) == list(meta["choices"])
        return
    if typing.get_origin(kind) is list:
        assert param.multiple, param.name
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) is dict:  # KEY=VALUE,KEY=VALUE
        assert param.type.convert("output=answer, input=context", param, None) == {
            "output": "answer",
            "input": "context",
        }
        return
    if meta["choices"] is not None:
        assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == meta["choices"]
    elif meta["min"] is not None or meta["max"] is not None:
        assert type(param.type) is {int: click.IntRange, float: FiniteRange}[kind], param.name
        bounds = (param.type.min, param.type.max, param.type.min_open, param.type.max_open)
        assert bounds == (meta["min"], meta["max"], meta["min_open"], meta["max_open"]), param.name
    else:
        expected = {int: click.INT, float: FiniteRange, str: click.STRING}[kind]
        assert param.type is expected or type(param.type) is expected, param.name


def test_train_options_are_the_recipe_fields_they_name():
    for param in train.params:
        if param.name not in _RUN_OPTIONS:
            check_field_option(param)
    assert {p.name for p in train.params} - _RUN_OPTIONS == set(TRAIN_FIELDS)
    # the one list of implementations, as the models define it
    (impl,) = [p for p in train.params if p.name == "moe_implementation"]
    assert tuple(impl.type.choices) == MOE_IMPLEMENTATIONS


def test_the_recipe_table_names_what_the_layers_above_define():
    from moe_train.data.formats import FORMATS
    from moe_train.data.templates import TEMPLATES
    from moe_train.engine.deepspeed_config import shipped_configs
    from moe_train.recipes import recipe

    assert recipe.SHIPPED_DEEPSPEED.split(", ") == shipped_configs()
    assert recipe.DATA_FORMATS == FORMATS and recipe.TEMPLATES == tuple(TEMPLATES)


def test_plan_options_named_after_recipe_fields_are_those_fields():
    from moe_train.plan.command import PLAN_FIELDS, plan

    for param in plan.params:
        if param.name in PLAN_FIELDS:
            check_field_option(param)
    # plan --ep is a question (estimate EP of this degree beside ZeRO-3), not the recipe's degree
    assert {p.name for p in plan.params} & set(FIELDS) == {*PLAN_FIELDS, "ep"}


@pytest.mark.parametrize("args", [["--max-length", "1"], ["--eval-fraction", "1"], ["--lr", "0"], ["--sp", "0"]])
def test_field_options_refuse_out_of_range_values_before_anything_runs(args):
    out = CliRunner().invoke(main, ["train", "tiny", *args])
    assert out.exit_code == 2 and f"Invalid value for '{args[0]}'" in out.output


def test_recipe_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype='fp16' is not one of"):
        get_recipe("tiny").replace(dtype="fp16")


def test_export_cli_surface_is_pinned():
    from moe_train.cli import export_command

    assert sorted(o for p in export_command.params for o in p.opts) == sorted(
        ["checkpoint_url", "out_url", "--dtype", "--max-shard-size"]
    )
    assert all(p.help for p in export_command.params if isinstance(p, click.Option))


@pytest.mark.parametrize(
    "item,expected",
    [
        ("grad_accum=4", ("grad_accum", 4)),
        ("betas=(0.9, 0.95)", ("betas", (0.9, 0.95))),
        ("too_long=drop", ("too_long", "drop")),
        ("too_long='drop'", ("too_long", "drop")),
        ("tokenizer=None", ("tokenizer", None)),
        ("model=/models/1234", ("model", "/models/1234")),
        ("varlen=False", ("varlen", False)),
    ],
)
def test_cfg_options_parse_typed_values(item, expected):
    assert parse_assignment(item) == expected


def test_unknown_recipe_lists_the_recipes():
    out = CliRunner().invoke(main, ["train", "nope"])
    assert out.exit_code != 0 and "deepseek_v2_chat_full_alpaca_e3" in out.output and "tiny" in out.output
