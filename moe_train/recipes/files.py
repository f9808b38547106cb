"""Recipe files: a user's recipe as YAML, checked by the same table as the built-ins.

YAML rather than TOML: a recipe has unset fields (``model: null`` for a seeded model, ``max_steps:
null``) and TOML has no null; and PyYAML, already installed with transformers and TorchX, both reads
and writes it, so ``moe-train recipes --dump`` needs nothing more.  Files are read with YAML's safe
loader (no Python objects), which here also reads ``1e-5`` as a number, as YAML 1.2 does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

from moe_train.recipes.recipe import FIELDS, Recipe, coerce, problem, unknown_key
from moe_train.storage import redact, resolve

SUFFIXES = (".yaml", ".yml")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-5`` and ``2E3`` as numbers (YAML 1.1 wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def is_recipe_file(name: str) -> bool:
    return name.endswith(SUFFIXES)


def load_recipe(path: str) -> Recipe:
    """The recipe in the YAML file at ``path`` (a local path or fsspec URL); for anything wrong in it one
    ValueError line naming the file (and the line or key)."""
    where = redact(path)
    fs, root = resolve(path)
    try:
        text = fs.cat_file(root).decode()
    except FileNotFoundError:
        raise ValueError(
            f"recipe file {where} does not exist; pass an existing .yaml file or a built-in name"
        ) from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe file {where} cannot be read ({type(e).__name__}); pass a YAML text file") from None
    try:
        values = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{where}{at} is not valid YAML ({getattr(e, 'problem', None) or e}); fix the file") from None
    return from_mapping(values, where)


def from_mapping(values: Any, where: str) -> Recipe:
    """A recipe from a mapping of field names to values, every key and value checked."""
    if not isinstance(values, dict):
        raise ValueError(
            f"{where} holds {type(values).__name__}, not a mapping of recipe fields; start from the output of "
            "`moe-train recipes --dump tiny`"
        )
    names = list(FIELDS)
    for key in values:
        if key not in FIELDS:
            raise ValueError(f"{where}: {unknown_key(str(key), names)}; the keys are the recipe fields of --dump")
    required = [
        n for n, f in FIELDS.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in values]
    if missing:
        raise ValueError(f"{where}: {' and '.join(missing)} missing; every recipe names them")
    checked = {}
    for key, value in values.items():
        value = coerce(key, value)
        wrong = problem(key, value)
        if wrong:
            raise ValueError(f"{where}: {key}: {value!r} {wrong}; fix {key} in the file")
        checked[key] = value
    return Recipe(**checked)


def dump_recipe(recipe: Recipe) -> str:
    """``recipe`` as a YAML file to start from: every field, its help as a comment above it."""
    lines = ["# A moe-train recipe: `moe-train train THIS.yaml`. Every field, with what it does above it."]
    for name, f in FIELDS.items():
        value = getattr(recipe, name)
        value = list(value) if isinstance(value, tuple) else value
        lines.append(f"# {f.metadata['help']}")
        lines.append(yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False, width=1000).rstrip())
    return "\n".join(lines) + "\n"
