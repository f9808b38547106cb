"""Training data: read sources with `datasets`, apply the chat template, pack into the memory-mapped
cache, and hand out per-rank batches.

``build_packed_dataset`` reads and packs (once; the cache shares it); ``PackedLoader`` iterates the
packs for one rank.
"""

from moe_train.data.build import build_packed_dataset
from moe_train.data.formats import FORMATS, parse_columns, read_conversations
from moe_train.data.loader import PackedLoader
from moe_train.data.packing import Pack, PackStats, pack
from moe_train.data.sources import DataError
from moe_train.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    encode_conversations,
    encode_messages,
    named_template,
    resolve_template,
)

__all__ = [
    "ChatTemplate",
    "DataError",
    "FORMATS",
    "IGNORE_INDEX",
    "Pack",
    "PackStats",
    "PackedLoader",
    "TEMPLATES",
    "build_packed_dataset",
    "encode_conversations",
    "encode_messages",
    "named_template",
    "pack",
    "parse_columns",
    "read_conversations",
    "resolve_template",
]
