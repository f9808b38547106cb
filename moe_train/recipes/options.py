"""Command-line options made from the recipe's fields: name, type, range, choices and help all come from
the field (recipes/recipe.py), so `moe-train train`, `moe-train plan` and `--cfg-options` cannot drift
from the recipe."""

from __future__ import annotations

import ast
import math
import typing
from collections.abc import Callable, Iterable
from typing import Any

import click

from moe_train.recipes.recipe import FIELDS, coerce, optional_type, problem, unknown_key

KEEP = "  [default: the recipe's]"


class _Pairs(click.ParamType):
    """``KEY=VALUE,KEY=VALUE`` -> a dict (a mapping field on the command line)."""

    name = "KEY=VALUE,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, str]:
        if isinstance(value, dict):
            return value
        pairs = [p.partition("=") for p in str(value).split(",") if p.strip()]
        if not all(sep and k.strip() and v.strip() for k, sep, v in pairs):
            self.fail(f"{value!r}: expected KEY=VALUE pairs separated by commas", param, ctx)
        return {k.strip(): v.strip() for k, _, v in pairs}


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's ranges let nan through every bound)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def click_type(name: str) -> Any:
    """The click type of the field ``name`` (of its elements, for a list)."""
    meta = FIELDS[name].metadata
    kind, _ = optional_type(name)
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) is dict:
        return _Pairs()
    if meta["choices"] is not None:
        return click.Choice(meta["choices"])
    if meta["min"] is None and meta["max"] is None:
        return {int: click.INT, float: FiniteRange(), str: click.STRING}[kind]
    ranged = {int: click.IntRange, float: FiniteRange}[kind]
    return ranged(meta["min"], meta["max"], min_open=meta["min_open"], max_open=meta["max_open"])


class _Names(click.ParamType):
    """A comma-separated list of names from ``choices`` (``--report-to mlflow,wandb``)."""

    name = "NAMES"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        if isinstance(value, list):
            return value
        names = [v.strip() for v in str(value).split(",") if v.strip()]
        bad = [v for v in names if v not in self.choices]
        if bad or not names:
            self.fail(f"{value!r}: use any of {', '.join(self.choices)}, comma separated", param, ctx)
        return names


def recipe_option(name: str) -> Callable[[Any], Any]:
    """``--kebab-name`` for the field ``name``, default None (keep the recipe's value); a boolean is a
    pair of flags, a list a repeatable option."""
    meta, flag = FIELDS[name].metadata, "--" + name.replace("_", "-")
    kind, _ = optional_type(name)
    if kind is bool:
        off = "--" + (meta["off_flag"] or "no-" + flag[2:])
        return click.option(f"{flag}/{off}", name, default=None, help=meta["help"] + KEEP)
    repeatable = typing.get_origin(kind) is list
    if repeatable and meta["choices"] is not None:  # a list of names: one comma-separated value
        return click.option(flag, name, type=_Names(meta["choices"]), default=None, help=meta["help"] + KEEP)
    help_text = meta["help"] + (" Repeatable." if repeatable else "") + KEEP
    return click.option(flag, name, type=click_type(name), default=None, multiple=repeatable, help=help_text)


def recipe_options(names: Iterable[str]) -> Callable[[Any], Any]:
    """The options of the fields ``names`` on a click command, in that order."""

    def decorate(command: Any) -> Any:
        for name in reversed(list(names)):
            command = recipe_option(name)(command)
        return command

    return decorate


def given(values: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The fields among ``names`` given on the command line (a repeatable option's values as a list)."""
    out = {}
    for name in names:
        value = values[name]
        if isinstance(value, tuple):
            value = list(value) or None
        if value is not None:
            out[name] = value
    return out


def parse_assignment(item: str) -> tuple[str, Any]:
    """One ``--cfg-options key=value``: the field and its value, read as a Python literal (a bare word
    for a text field), checked against the field's type and range."""
    key, sep, raw = item.partition("=")
    names = sorted(set(FIELDS) - {"name"})
    if not sep or key not in names:
        why = unknown_key(key, names) if sep else "no '='"
        raise click.BadParameter(
            f"{item!r}: {why}; expected key=value with key one of {names}", param_hint="--cfg-options"
        )
    kind, _ = optional_type(key)
    textual = kind is str or typing.get_origin(kind) is list  # str, str | None and lists of paths
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if not textual:
            raise click.BadParameter(
                f"{item!r}: {raw!r} is not a Python literal for {key}", param_hint="--cfg-options"
            ) from None
        value = raw
    if kind is str and value is not None and not isinstance(value, str):
        value = raw  # e.g. template=deepseek_v2 or a path that happens to parse as a number
    value = coerce(key, value)
    wrong = problem(key, value)
    if wrong:
        raise click.BadParameter(f"{item!r}: {key}={value!r} {wrong}", param_hint="--cfg-options")
    return key, value
