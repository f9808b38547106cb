"""Training recipes: typed, named, complete descriptions of a fine-tuning job.

``recipe.py`` holds the `Recipe` dataclass, one field per knob with its help text and accepted values;
``builtin.py`` the shipped recipes; ``files.py`` users' own recipes as YAML files, checked by the same
table; ``options.py`` the command-line options made from the fields.  The CLI overrides single fields
(``--lr``, ``--max-length`` ...) or any field with ``--cfg-options key=value``.
"""

from moe_train.recipes.builtin import ASSETS, RECIPES, get_recipe
from moe_train.recipes.facts import component_facts
from moe_train.recipes.files import dump_recipe, is_recipe_file, load_recipe
from moe_train.recipes.recipe import DTYPES, FIELDS, Recipe, problem, recipe_record

__all__ = [
    "ASSETS",
    "DTYPES",
    "FIELDS",
    "RECIPES",
    "Recipe",
    "component_facts",
    "dump_recipe",
    "get_recipe",
    "load_recipe",
    "problem",
    "recipe_by_name_or_file",
    "recipe_record",
]


def recipe_by_name_or_file(name: str) -> Recipe:
    """A built-in recipe by name, or the recipe in a YAML file (a path or URL ending in .yaml or .yml)."""
    if is_recipe_file(name):
        return load_recipe(name)
    try:
        return get_recipe(name)
    except ValueError as e:
        raise ValueError(f"{e}, or the path of a recipe file (.yaml)") from None
