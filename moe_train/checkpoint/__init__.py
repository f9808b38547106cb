"""Checkpoint I/O outside the models: the HF layout of every registered family, and training state.

``load_pretrained(url)`` reads config.json's ``model_type`` and builds that family's model;
``save_pretrained(model, url)`` writes its HF layout.  The seed's API,
``DeepseekV2ForCausalLM.from_pretrained(url, ...)`` and ``model.save_pretrained(url)``, is attached
here to every family's model class, so the model modules themselves import nothing of this package.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_train.checkpoint.hf_layout import load_pretrained, save_pretrained
from moe_train.models import families

__all__ = ["load_pretrained", "save_pretrained"]


def _from_pretrained(
    cls,
    path: str,
    moe_implementation: str = "shard",
    expert_in_one_shard: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_backend: str = "auto",
    **storage_options: Any,
):
    """Load a checkpoint in the family's official HF layout from a local path or fsspec URL."""
    model = load_pretrained(
        path,
        moe_implementation=moe_implementation,
        expert_in_one_shard=expert_in_one_shard,
        dtype=dtype,
        device=device,
        attn_backend=attn_backend,
        storage_options=storage_options,
    )
    if type(model) is not cls:  # exact: DeepseekV3ForCausalLM extends DeepseekV2ForCausalLM
        raise ValueError(
            f"{path} holds a {type(model).__name__} checkpoint, not {cls.__name__}; use "
            "moe_train.checkpoint.load_pretrained for any family"
        )
    return model


def _save_pretrained(self, path: str, max_shard_size: int | str = "5GB", **storage_options: Any) -> None:
    """Write the family's official HF layout (per-expert keys) to a local path or fsspec URL."""
    save_pretrained(self, path, max_shard_size=max_shard_size, storage_options=storage_options)


for _spec in families():
    _spec.model_cls.from_pretrained = classmethod(_from_pretrained)
    _spec.model_cls.save_pretrained = _save_pretrained
