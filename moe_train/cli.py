"""The ``moe-train`` command line: thin click commands that build a dataclass and call the library."""

from __future__ import annotations

import click

from moe_train.recipes import RECIPES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Full fine-tuning of DeepSeek V2 MoE models with sharded experts under DeepSpeed ZeRO-3."""


@main.command()
def recipes() -> None:
    """List the shipped recipes, one line each."""
    for name in sorted(RECIPES):
        click.echo(f"{name:48s} {RECIPES[name].description}")


if __name__ == "__main__":
    main()
