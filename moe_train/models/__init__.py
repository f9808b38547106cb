"""Model families, each a folder registering a ``ModelSpec`` (``common/spec.py``); shared blocks in ``common/``.

The families are imported (registered) by ``moe_train/__init__.py``, so code that takes a spec
(checkpoint I/O, the engine, the planner) imports none of them.
"""

from moe_train.models.common.spec import ModelSpec, families, param_counts, spec_for, spec_of

__all__ = ["ModelSpec", "families", "param_counts", "spec_for", "spec_of"]
