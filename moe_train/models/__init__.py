"""Model families, each a folder registering a ``ModelSpec`` (``common/spec.py``); shared blocks in ``common/``."""

from moe_train.models import deepseek_v2  # noqa: F401  (registers the family)
from moe_train.models.common.spec import ModelSpec, families, param_counts, spec_for, spec_of

__all__ = ["ModelSpec", "families", "param_counts", "spec_for", "spec_of"]
