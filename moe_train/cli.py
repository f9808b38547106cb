"""The ``moe-train`` command line: thin click commands that build a dataclass and call the library."""

from __future__ import annotations

import ast
import dataclasses
import typing

import click

from moe_train.engine.distributed import LAUNCHERS
from moe_train.engine.preemption import DEFAULT_GRACE_S
from moe_train.models.common.experts import MOE_IMPLEMENTATIONS
from moe_train.plan.command import plan
from moe_train.recipes import RECIPES, Recipe, get_recipe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Full fine-tuning of DeepSeek V2 MoE models with sharded experts under DeepSpeed ZeRO-3."""


@main.command()
def recipes() -> None:
    """List the shipped recipes, one line each."""
    for name in sorted(RECIPES):
        click.echo(f"{name:48s} {RECIPES[name].description}")


def _parse_cfg_option(recipe: Recipe, item: str) -> tuple[str, typing.Any]:
    key, sep, raw = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    if not sep or key not in fields or key == "name":
        raise click.BadParameter(f"{item!r}: expected key=value with key one of {sorted(set(fields) - {'name'})}",
                                 param_hint="--cfg-options")
    textual = "str" in str(typing.get_type_hints(Recipe)[key])  # str or str | None: a bare word is text
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if not textual:
            raise click.BadParameter(f"{item!r}: {raw!r} is not a Python literal for {key}",
                                     param_hint="--cfg-options") from None
        value = raw
    if textual and value is not None and not isinstance(value, str):
        value = raw  # e.g. template=deepseek_v2 or a path that happens to parse as a number
    return key, value


@main.command()
@click.argument("recipe_name", metavar="RECIPE")
@click.option("--deepspeed", default=None, help="DeepSpeed config: a shipped name (deepspeed_zero2, deepspeed_zero3, "
              "deepspeed_zero3_offload) or a JSON path. Default: the recipe's.")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="none", show_default=True,
              help="How processes were started: none (one process), pytorch (torchrun env), slurm (plain srun).")
@click.option("--work-dir", default=None, help="Local path or fsspec URL for checkpoints, metrics and the HF "
              "export. Default: work_dirs/RECIPE.")
@click.option("--model", default=None, help="HF checkpoint directory or fsspec URL (overrides the recipe).")
@click.option("--data", multiple=True, help="Training data: alpaca JSON/JSONL or messages JSONL, path or URL. Repeatable.")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Tokens per packed sequence.")
@click.option("--varlen/--no-varlen", default=None, help="Attend only within each packed sample (default) or across "
              "the whole pack (XTuner's classic packing).")
@click.option("--sp", type=click.IntRange(min=1), default=None, help="Sequence-parallel degree (must divide the world size).")
@click.option("--ep", type=click.IntRange(min=1), default=None, help="Expert-parallel degree: each group of N "
              "consecutive ranks splits the routed experts and exchanges tokens (must divide the world size and the "
              "expert count; ZeRO-3).")
@click.option("--moe-implementation", type=click.Choice(MOE_IMPLEMENTATIONS), default=None,
              help="Experts stacked in shards (default) or one module per expert (baseline).")
@click.option("--expert-in-one-shard", type=click.IntRange(min=1), default=None, help="Experts per shard; must divide the expert count.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many optimiser steps.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--seed", type=int, default=None, help="Seed for data order and seeded initialisation.")
@click.option("--save-steps", type=click.IntRange(min=0), default=None, help="Save a training checkpoint every N steps (0: never).")
@click.option("--resume", default=None, help="'auto' (newest complete checkpoint in the work dir, if any) or a "
              "checkpoint URL.")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak TFLOP/s of one device for MFU (default: from "
              "the device table; unknown on CPU).")
@click.option("--cfg-options", multiple=True, metavar="KEY=VALUE", help="Override any recipe field, e.g. "
              "grad_accum=4 or betas='(0.9,0.95)'. Repeatable.")
@click.option("--no-export", is_flag=True, help="Skip the HF export at the end.")
@click.option("--preempt-grace", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_GRACE_S, show_default=True,
              metavar="SECONDS",
              help="Time the scheduler allows between SIGTERM/SIGUSR1 and SIGKILL (Slurm KillWait or GraceTime, "
              "Kubernetes terminationGracePeriodSeconds, torchrun --shutdown-timeout): on a stop signal the "
              "current step and a checkpoint must fit in it, and the log says when they do not. A second "
              "identical signal exits at once.")
def train(recipe_name: str, deepspeed, launcher, work_dir, model, data, max_length, varlen, sp, ep, moe_implementation,
          expert_in_one_shard, max_steps, epochs, lr, seed, save_steps, resume, peak_tflops, cfg_options,
          no_export, preempt_grace) -> None:
    """Fine-tune RECIPE (see `moe-train recipes`)."""
    try:
        recipe = get_recipe(recipe_name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="RECIPE")
    overrides = {k: v for k, v in dict(
        model=model, data=list(data) or None, max_length=max_length, varlen=varlen, sp=sp, ep=ep,
        moe_implementation=moe_implementation, expert_in_one_shard=expert_in_one_shard, max_steps=max_steps,
        epochs=epochs, lr=lr, seed=seed, save_steps=save_steps).items() if v is not None}
    if model is not None:
        overrides["model_size"] = None
    overrides.update(_parse_cfg_option(recipe, item) for item in cfg_options)
    recipe = recipe.replace(**overrides)

    from moe_train.engine.distributed import destroy_distributed, hard_exit
    from moe_train.engine.preemption import EXIT_PREEMPTED, StopRequested
    from moe_train.engine.train import TrainConfig, train as run

    tc = TrainConfig(recipe=recipe, work_dir=work_dir or f"work_dirs/{recipe.name}",
                     deepspeed=deepspeed or recipe.deepspeed, launcher=launcher, resume=resume,
                     peak_tflops=peak_tflops, export=not no_export, preempt_grace=preempt_grace)
    code = 0
    try:
        run(tc)
        destroy_distributed()
    except StopRequested as e:
        click.echo(f"moe-train: {e}", err=True)
        code = EXIT_PREEMPTED
    except (ValueError, FileNotFoundError, PermissionError) as e:
        click.echo(f"Error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        code = 1
    # Skip interpreter shutdown: on gloo it can abort (SIGABRT) after all work is done.
    hard_exit(code)


main.add_command(plan)

if __name__ == "__main__":
    main()
