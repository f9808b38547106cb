"""The CLI surface and every shipped recipe."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from moe_train.cli import _parse_cfg_option, main, train
from moe_train.data.templates import TEMPLATES
from moe_train.engine.deepspeed_config import load_deepspeed_config
from moe_train.plan import model_config, model_layout
from moe_train.recipes import RECIPES, get_recipe


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
        ]
    )
    assert all(p.help for p in train.params if isinstance(p, click.Option))


# train options that are not recipe fields: how and where the job runs
_RUN_OPTIONS = {
    "recipe_name",
    "deepspeed",
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
}


def test_recipe_flags_of_train_are_recipe_fields_of_the_same_type():
    """The typed shortcuts beside --cfg-options must stay in step with Recipe."""
    import dataclasses
    import typing

    from moe_train.recipes import Recipe

    hints = typing.get_type_hints(Recipe)
    fields = {f.name for f in dataclasses.fields(Recipe)}
    for param in train.params:
        if param.name in _RUN_OPTIONS:
            continue
        assert param.name in fields, f"--{param.name} is not a Recipe field"
        hint = str(hints[param.name])
        kinds = [
            (click.types.BoolParamType, "bool"),
            (click.types.IntParamType, "int"),
            (click.types.FloatParamType, "float"),
            (click.Choice, "str"),
            (click.types.StringParamType, "str"),
        ]
        kind = next(k for t, k in kinds if isinstance(param.type, t))
        assert kind and kind in hint, f"--{param.name} parses {param.type!r} but Recipe.{param.name} is {hint}"


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
    assert _parse_cfg_option(get_recipe("tiny"), item) == expected


def test_unknown_recipe_lists_the_recipes():
    out = CliRunner().invoke(main, ["train", "nope"])
    assert out.exit_code != 0 and "deepseek_v2_chat_full_alpaca_e3" in out.output and "tiny" in out.output
