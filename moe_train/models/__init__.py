"""Model families, each a folder registering a ``ModelSpec`` (``common/spec.py``); shared blocks in ``common/``."""

from moe_train.models import deepseek_v2, deepseek_v3  # noqa: F401  (register the families)
from moe_train.models.common.spec import ModelSpec, families, param_counts, spec_for, spec_of

__all__ = ["ModelSpec", "families", "param_counts", "spec_for", "spec_of"]
