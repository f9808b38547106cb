"""Where a run's initial weights come from: an HF checkpoint, or a seeded initialisation.

Both are tensor sources for `moe_train.checkpoint.hf_layout.load_into`, which fills each rank's own
partition from them.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from moe_train.checkpoint.hf_layout import HFCheckpoint, expected_hf_keys
from moe_train.models.deepseek_v2.config import DeepseekV2Config


class SeededInit:
    """A tensor source that initialises each HF key from its own seeded generator.

    Values depend only on (seed, key), never on the expert layout or the world size, so `shard`
    and `origin` runs, and ZeRO-2 and ZeRO-3 runs, start from identical weights.
    """

    def __init__(self, cfg: DeepseekV2Config, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
        self.cfg, self.shapes, self.seed = cfg, shapes, seed
        self.weight_map = dict.fromkeys(shapes, "seeded")
        self.url = f"seeded-init(seed={seed})"

    def keys_by_file(self):
        yield "seeded", list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        shape = self.shapes[key]
        if "norm" in key:
            full = torch.ones(shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            full = torch.randn(shape, generator=g) * self.cfg.initializer_range
        return full if start == 0 and end is None else full.reshape(-1)[start:end]


def open_source(cfg: DeepseekV2Config, model: torch.nn.Module, model_url: str | None, seed: int,
                storage_options: dict[str, Any] | None = None) -> Any:
    if model_url is None:
        return SeededInit(cfg, {k: shape for k, (_, shape) in expected_hf_keys(model).items()}, seed)
    return HFCheckpoint(model_url, storage_options)
