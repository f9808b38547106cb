"""The facts of the built-in recipes that the TorchX catalogue keeps a copy of."""

from __future__ import annotations

import json
from typing import Any

from moe_train.recipes.builtin import RECIPES

# The TorchX catalogue (components/components.py) imports nothing but TorchX, yet shows the recipe's model
# and data in the job it describes: it keeps a copy of these facts, which `python -m moe_train.recipes`
# rewrites and tests/test_launch.py holds equal to the recipes.
FACTS_BEGIN = "# BEGIN recipe facts"
FACTS_END = "# END recipe facts"


def component_facts() -> dict[str, dict[str, Any]]:
    """Model and data of every recipe that names a checkpoint (the full-size ones)."""
    return {name: {"model": r.model, "data": list(r.data)} for name, r in sorted(RECIPES.items()) if r.model}


def facts_block() -> str:
    lines = [
        f"{FACTS_BEGIN}: generated from the built-in recipes by `python -m moe_train.recipes`; a test keeps "
        "it current.",
        "_RECIPE_FACTS: Dict[str, Dict[str, object]] = {",
    ]
    for name, facts in component_facts().items():  # one key a line, trailing commas: as ruff formats it
        lines += [
            f"    {json.dumps(name)}: {{",
            *(f"        {json.dumps(k)}: {json.dumps(v)}," for k, v in facts.items()),
        ]
        lines.append("    },")
    return "\n".join([*lines, "}", FACTS_END])


def write_facts(path: str) -> bool:
    """Rewrite the facts block of the catalogue at ``path``; True when it changed."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(FACTS_BEGIN), text.index(FACTS_END) + len(FACTS_END)
    new = text[:start] + facts_block() + text[end:]
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text
