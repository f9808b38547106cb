"""``python -m moe_train.recipes``: rewrite the TorchX catalogue's copy of the recipe facts."""

import pathlib

from moe_train.recipes.facts import write_facts

catalogue = pathlib.Path(__file__).resolve().parents[2] / "components" / "components.py"
print(f"{catalogue}: {'updated' if write_facts(str(catalogue)) else 'already current'}")
