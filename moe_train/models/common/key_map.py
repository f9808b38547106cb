"""The declarative map between our parameter names and a family's HF checkpoint keys.

Every HF tensor lands in a *slot* of one of our parameters: the whole parameter or, for experts
stacked into (S, rows, cols) parameters, one expert's rows (all of them, or one half of a fused
gate/up pair).  Templates use ``{}`` for layer, expert and shard indices.  One map serves loading,
saving, the streamed export under ZeRO-3 and partition-wise loading, in both directions.
A name that no template matches is an error: nothing is ever exported under a guessed key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Name segments that wrappers add around our modules: DeepSpeed's engine, torch.compile, activation
# checkpointing.  They are stripped explicitly; anything else unknown raises.
WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """Our parameter name without the segments wrappers add (see WRAPPER_SEGMENTS)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives: param[expert] (all rows, or half 0/1 of them); expert None: all of param."""

    param: str
    expert: int | None = None
    half: int | None = None

    def view(self, tensor):
        """The region of our full parameter `tensor` this slot covers."""
        if self.expert is None:
            return tensor
        t = tensor[self.expert]
        if self.half is None:
            return t
        n = t.shape[0] // 2
        return t[self.half * n : (self.half + 1) * n]

    def shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor's shape, given our parameter's full shape."""
        if self.expert is None:
            return tuple(param_shape)
        rows = param_shape[1] // 2 if self.half is not None else param_shape[1]
        return (rows, *param_shape[2:])

    def flat_range(self, param_shape: tuple[int, ...]) -> tuple[int, int]:
        """[start, end) of this slot in the row-major flattening of a parameter of `param_shape`."""
        numel = math.prod(param_shape)
        if self.expert is None:
            return 0, numel
        per_expert = numel // param_shape[0]
        size = math.prod(self.shape(param_shape))
        start = self.expert * per_expert + (self.half or 0) * size
        return start, start + size


LAYER = "model.layers.{}."  # the prefix of a decoder layer's templates


def in_layers(templates: list[str]) -> list[str]:
    """Templates relative to a decoder layer, under ``model.layers.{layer}.``."""
    return [LAYER + t for t in templates]


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


class KeyMap:
    """``same``: templates whose HF key equals our name.  ``stacked``: our template of a stacked
    (S, ...) expert parameter -> the HF templates of each expert's tensors in it, with the half of
    the rows each fills (None: all rows); ours is ``...{layer}...{shard}...``, HF ``...{layer}...{expert}...``."""

    def __init__(self, family: str, same: list[str], stacked: dict[str, list[tuple[str, int | None]]]) -> None:
        self.family = family
        self._same = [_pattern(t) for t in same]
        self._stacked = [(_pattern(ours), parts) for ours, parts in stacked.items()]

    def ours_to_hf(self, name: str, experts_per_shard: int) -> list[tuple[str, Slot]]:
        """The HF tensors stored in our parameter ``name``, in checkpoint order."""
        name = canonical_name(name)
        for pattern, parts in self._stacked:
            m = pattern.match(name)
            if m:
                layer, shard = int(m.group(1)), int(m.group(2))
                out = []
                for index in range(experts_per_shard):
                    expert = shard * experts_per_shard + index
                    out += [(hf.format(layer, expert), Slot(name, index, half)) for hf, half in parts]
                return out
        if any(p.match(name) for p in self._same):
            return [(name, Slot(name))]
        raise ValueError(
            f"parameter {name!r} has no key in the {self.family} HF key map; add it to the family's "
            "state_dict_adapter.py"
        )
