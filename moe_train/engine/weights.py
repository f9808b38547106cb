"""Tensor sources for a (possibly ZeRO-3 partitioned) model, and its streamed HF export.

Loading is `moe_train.checkpoint.hf_layout.load_into`: it fills each rank's own partition from
byte ranges of the safetensors files (or from `SeededInit`).  Exporting gathers one parameter at
a time and streams it into the HF layout on the writer rank.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import torch
import torch.distributed as dist

from moe_train.checkpoint.hf_layout import HFCheckpoint, HFExportWriter, expected_hf_keys
from moe_train.checkpoint.safetensors_io import PlannedTensor
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.state_dict_adapter import ours_to_hf


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


def _gathered(param: torch.Tensor):
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def export_hf(model: torch.nn.Module, url: str, *, is_writer: bool, tokenizer_dir: str | None,
              max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
              storage_options: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Stream `model` into the HF layout at `url`; every rank must call this (collective gathers)."""
    expected = expected_hf_keys(model)
    params = dict(model.named_parameters())
    writer = None
    if is_writer:
        planned = [PlannedTensor(k, dtype or params[s.param].dtype, shape) for k, (s, shape) in expected.items()]
        writer = HFExportWriter(url, planned, max_shard_size, storage_options)
    try:
        for name, param in params.items():
            with _gathered(param):
                if writer is not None:
                    for key, slot in ours_to_hf(name, model.config):
                        t = slot.view(param.data)
                        writer.write(key, t if dtype is None else t.to(dtype))
        if dist.is_initialized():
            dist.barrier()
        if writer is not None:
            writer.finish(model.config, tokenizer_dir, extra)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
