"""The one key map between our parameters and the official DeepSeek V2 HF checkpoint keys.

Every HF tensor lands in a *slot* of one of our parameters: the whole parameter, or for the
`shard` layout one expert's rows of a stacked (S, rows, cols) parameter.  The same map serves
loading, saving, the streamed export under ZeRO-3 and partition-wise loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_train.models.deepseek_v2.config import DeepseekV2Config

# HF key -> (our parameter, part of it).  "{}" are filled with (layer, expert) / (layer, shard).
# Keys not listed map to the parameter of the same name.
SHARD_EXPERT_KEYS: dict[str, tuple[str, str]] = {
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": ("model.layers.{}.mlp.experts.{}.gate_up_proj", "gate"),
    "model.layers.{}.mlp.experts.{}.up_proj.weight": ("model.layers.{}.mlp.experts.{}.gate_up_proj", "up"),
    "model.layers.{}.mlp.experts.{}.down_proj.weight": ("model.layers.{}.mlp.experts.{}.down_proj", "all"),
}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_TO_HF = {}
for _hf, (_ours, _part) in SHARD_EXPERT_KEYS.items():
    _TO_HF.setdefault(_ours, []).append((_hf, _part))
_TO_HF_PATTERNS = [(_pattern(ours), parts) for ours, parts in _TO_HF.items()]


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives: param[expert][rows] (expert None: the whole parameter)."""

    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def view(self, tensor):
        """The region of our full parameter `tensor` this slot covers."""
        if self.expert is None:
            return tensor
        t = tensor[self.expert]
        return t if self.rows is None else t[self.rows[0]:self.rows[1]]

    def flat_range(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """[start, end) of this slot in the row-major flattening of a parameter of `shape`."""
        numel = 1
        for s in shape:
            numel *= s
        if self.expert is None:
            return 0, numel
        per_expert = numel // shape[0]
        per_row = per_expert // shape[1]
        lo, hi = self.rows if self.rows is not None else (0, shape[1])
        start = self.expert * per_expert + lo * per_row
        return start, start + (hi - lo) * per_row


def _rows(cfg: DeepseekV2Config, part: str) -> tuple[int, int] | None:
    f = cfg.moe_intermediate_size
    return {"gate": (0, f), "up": (f, 2 * f), "all": None}[part]


# Name segments that wrappers add around our modules: DeepSpeed's engine, torch.compile, activation
# checkpointing.  They are stripped explicitly; anything else unknown is an error, never exported.
WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """Our parameter name without the segments wrappers add (see WRAPPER_SEGMENTS)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def ours_to_hf(name: str, cfg: DeepseekV2Config) -> list[tuple[str, Slot]]:
    """The HF tensors stored in our parameter `name`, in checkpoint order."""
    name = canonical_name(name)
    if cfg.moe_implementation == "shard":
        for pattern, parts in _TO_HF_PATTERNS:
            m = pattern.match(name)
            if m:
                layer, shard = int(m.group(1)), int(m.group(2))
                out = []
                for index in range(cfg.shard_size):
                    expert = shard * cfg.shard_size + index
                    out += [(hf.format(layer, expert), Slot(name, index, _rows(cfg, part))) for hf, part in parts]
                return out
    return [(name, Slot(name))]


def slot_shape(slot: Slot, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    if slot.expert is None:
        return tuple(param_shape)
    rows = slot.rows[1] - slot.rows[0] if slot.rows else param_shape[1]
    return (rows, *param_shape[2:])
