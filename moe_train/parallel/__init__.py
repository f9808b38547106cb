"""Parallelism applied to a model from outside: sequence parallelism (``--sp``)."""

from moe_train.parallel.sequence import SequenceParallel

__all__ = ["SequenceParallel"]
