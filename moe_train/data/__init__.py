"""Training data: read conversations, apply the chat template, pack, and hand out per-rank batches.

``build_packed_dataset`` reads and packs; ``PackedLoader`` iterates the packs for one rank.
"""

from moe_train.data.datasets import DataError, read_conversations
from moe_train.data.loader import PackedLoader, build_packed_dataset
from moe_train.data.packing import Pack, PackStats, pack
from moe_train.data.templates import IGNORE_INDEX, TEMPLATES, encode_conversations, encode_messages

__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "Pack",
    "PackStats",
    "PackedLoader",
    "TEMPLATES",
    "build_packed_dataset",
    "encode_conversations",
    "encode_messages",
    "pack",
    "read_conversations",
]
