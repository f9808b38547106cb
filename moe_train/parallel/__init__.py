"""Parallelism applied to a model from outside: the layout (``dims.py``: ``ParallelDims``), ZeRO-3
(``zero3.py``), expert parallelism (``expert.py``), sequence parallelism (``sequence.py``), and the one
place they are applied to a model (``distribute.py``)."""

from moe_train.parallel.dims import ParallelDims
from moe_train.parallel.sequence import SequenceParallel

__all__ = ["ParallelDims", "SequenceParallel"]
