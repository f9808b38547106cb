"""Where a run's initial weights come from: an HF checkpoint, or a seeded initialisation.

Both are tensor sources for `moe_train.checkpoint.hf_layout.load_into`, which fills each rank's own
partition from them.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from moe_train.checkpoint.hf_layout import HFCheckpoint, expected_hf_keys
from moe_train.models import spec_of


class SeededInit:
    """A tensor source that initialises each HF key from its own seeded generator.

    Values depend only on (seed, key), never on the expert layout or the world size, so `shard`
    and `origin` runs, and ZeRO-2 and ZeRO-3 runs, start from identical weights.  The rule is the
    modules' own: norm weights (the family's ``norm_types``) one, biases (and correction biases) zero, the rest
    normal(0, initializer_range).
    """

    def __init__(self, model: torch.nn.Module, seed: int) -> None:
        spec = spec_of(model)
        self.std, self.seed = model.config.initializer_range, seed
        self.shapes = {k: shape for k, (_, shape) in expected_hf_keys(model).items()}
        with torch.device("meta"):
            reference = spec.build(model.config, model.layout)
        self.ones = {
            key
            for module_name, module in reference.named_modules()
            if isinstance(module, spec.norm_types)
            for name, _ in module.named_parameters(prefix=module_name)
            for key, _ in spec.ours_to_hf(name, model.config, model.layout)
        }
        self.weight_map = dict.fromkeys(self.shapes, "seeded")
        self.url = f"seeded-init(seed={seed})"

    def keys_by_file(self):
        yield "seeded", list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        shape = self.shapes[key]
        if key in self.ones:
            full = torch.ones(shape)
        elif key.endswith((".bias", "_bias")):  # linear biases and DeepSeek V3's e_score_correction_bias
            full = torch.zeros(shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            full = torch.randn(shape, generator=g) * self.std
        return full if start == 0 and end is None else full.reshape(-1)[start:end]


def open_source(
    model: torch.nn.Module, model_url: str | None, seed: int, storage_options: dict[str, Any] | None = None
) -> Any:
    """The initial weights of ``model``: the checkpoint at ``model_url``, or seeded ones."""
    if model_url is None:
        return SeededInit(model, seed)
    return HFCheckpoint(model_url, storage_options)
