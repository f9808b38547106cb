"""The part of every family's config that is not the family's: reading and writing an HF ``config.json``,
checking its fields, named sizes.

A family's config is a dataclass extending ``HFConfig`` with the fields of its ``config.json`` (names and
defaults as the family's own code has them) and its named sizes.  ``from_hf_dict`` reads the remote-code
format and transformers 5's (``rope_parameters``); fields the family does not model are kept in
``source_fields`` and written back by ``to_hf_dict``, so the family's own remote code still loads an
export.  The expert layout (``models/common/experts.py``: ``ExpertLayout``) is a training choice, not
part of this schema: it is passed next to the config wherever a model is built.

What code outside the family reads (expert parallelism, the planner, the metrics) goes through the
properties below, which each family maps onto its own field names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Keys of a source config.json that stop describing the weights once we write them: the dtype is
# the export's own, and exported weights are never quantised.
_REWRITTEN_HF_KEYS = {
    "torch_dtype",
    "dtype",
    "quantization_config",
    "transformers_version",
    "rope_parameters",
    "model_type",
}
_NOT_SCHEMA = {"schema": False}  # field metadata: carried along, never a config.json field of its own


@dataclass
class HFConfig:
    FAMILY: ClassVar[str]  # for messages, e.g. "DeepSeek V2"
    MODEL_TYPES: ClassVar[tuple[str, ...]]  # config.json model_type values read (the first is the default written)
    ARCHITECTURE: ClassVar[str]  # written to "architectures" unless the source config.json had its own
    NAMED_SIZES: ClassVar[dict[str, dict[str, Any]]]
    # Fields the family's code defines but moe-train does not implement: field -> the one value it does.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}
    # Ranges of numeric fields: the smallest value (default 1), those that must be above it, the largest
    # that is not a typo (a vocabulary of 2**22 is 8x the largest in use; anything bigger would allocate
    # the embedding before failing).
    FIELD_MIN: ClassVar[dict[str, float]] = {
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "initializer_range": 0.0,
        "attention_dropout": 0.0,
        "rms_norm_eps": 0.0,
        "rope_theta": 0.0,
    }
    OPEN_MIN: ClassVar[frozenset[str]] = frozenset({"rms_norm_eps", "rope_theta"})
    FIELD_MAX: ClassVar[dict[str, float]] = {
        "vocab_size": 2**22,
        "attention_dropout": 1.0,
        "rope_theta": 1e9,
        "max_position_embeddings": 2**24,
    }

    # Fields of the source config.json that we do not model (auto_map, architectures ...), written
    # back unchanged on export so the family's own remote code still loads the result.
    source_fields: dict[str, Any] = field(default_factory=dict, metadata=_NOT_SCHEMA, compare=False, kw_only=True)
    # The model_type of the source config.json (one of MODEL_TYPES; None: the first), written back on export.
    source_model_type: str | None = field(default=None, metadata=_NOT_SCHEMA, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- what code outside the family reads
    @property
    def num_experts(self) -> int | None:
        """Routed experts of each MoE layer (None: no MoE layer)."""
        raise NotImplementedError

    @property
    def experts_per_token(self) -> int | None:
        raise NotImplementedError

    @property
    def expert_intermediate_size(self) -> int:
        raise NotImplementedError

    def is_moe_layer(self, layer_idx: int) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError naming the first bad field and the fix: each field's type and range, token ids,
        values not implemented.  A family extends it with the relations between its fields."""
        for f in dataclasses.fields(self):
            if f.metadata.get("schema", True):
                self._check_field(f.name, str(f.type), getattr(self, f.name))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            if value is not None and value >= self.vocab_size:
                raise ValueError(
                    f"config field {name}={value} is not below vocab_size={self.vocab_size}; "
                    "fix the token id or the vocabulary size"
                )
        for name, supported in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value != supported:
                raise ValueError(
                    f"{name}={value!r} is not supported by moe-train's {self.FAMILY}; set it to "
                    f"{supported!r} in config.json (every released {self.FAMILY} checkpoint does)"
                )

    def _check_field(self, name: str, annotation: str, value: Any) -> None:
        """One field's type and range; the message names the field and what to write instead."""
        kind = annotation.split(" | ")[0].split("[")[0]
        if value is None:
            if "None" not in annotation:
                raise ValueError(f"config field {name} is null; give it a value (or remove it for the default)")
            return
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"config field {name}={value!r} must be true or false")
            return
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"config field {name}={value!r} must be a string")
            return
        if kind == "dict":
            if not isinstance(value, dict):
                raise ValueError(f"config field {name}={value!r} must be a JSON object or null")
            factor = value.get("factor", 1)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor <= _DEFAULT_MAX:
                raise ValueError(f"config field {name}.factor={factor!r} must be a number >= 1")
            return
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                hint = (
                    f"write {int(value)}" if isinstance(value, float) and value.is_integer() else "write a whole number"
                )
                if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                    hint = f"write {value.strip()} without quotes"
                raise ValueError(f"config field {name}={value!r} must be an integer; {hint}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"config field {name}={value!r} must be a finite number")
        else:
            return
        low, high = self.FIELD_MIN.get(name, 1), self.FIELD_MAX.get(name, _DEFAULT_MAX)
        if value < low or (name in self.OPEN_MIN and value == low) or value > high:
            above = f"above {low}" if name in self.OPEN_MIN else f">= {low}"
            raise ValueError(f"config field {name}={value!r} is out of range; it must be {above} and <= {high}")

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def schema_fields(self) -> dict[str, Any]:
        """The config.json fields this class models, by name (what defines the model, with no carried extras)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("schema", True)}

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]):
        """Build from a ``config.json`` dict: the family's remote-code format or transformers 5's."""
        if not isinstance(d, dict):
            raise ValueError(
                f"config.json holds a JSON {type(d).__name__}, not an object; use a {cls.FAMILY} config.json"
            )
        model_type = d.get("model_type")
        if model_type not in cls.MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type={model_type!r}, not {' or '.join(map(repr, cls.MODEL_TYPES))}; "
                f"point --model at a {cls.FAMILY} checkpoint directory"
            )
        d = dict(d)
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise ValueError(f"config field rope_parameters={rope_parameters!r} must be a JSON object or null")
        if rope_parameters and not d.get("rope_scaling"):
            rp = dict(rope_parameters)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            rope_type = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rp}
        known = {f.name for f in dataclasses.fields(cls) if f.metadata.get("schema", True)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["source_fields"] = {k: v for k, v in d.items() if k not in known and k not in _REWRITTEN_HF_KEYS}
        kwargs["source_model_type"] = model_type
        for k in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(k), list) and kwargs[k]:  # generation configs list several; the first is ours
                kwargs[k] = kwargs[k][0]
        return cls(**kwargs)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The family's ``config.json`` content (loadable by transformers 5 and the family's remote code)."""
        d = self.schema_fields()
        if d.get("rope_scaling"):  # the remote-code key, which transformers 5 reads too
            rs = dict(d["rope_scaling"])
            rs.setdefault("type", rs.pop("rope_type", "yarn"))
            d["rope_scaling"] = rs
        return {
            "architectures": [self.ARCHITECTURE],
            **self.source_fields,
            "model_type": self.source_model_type or self.MODEL_TYPES[0],
            **d,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_json_file(cls, path: str):
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    # ---------------------------------------------------------------- named sizes
    @classmethod
    def from_name(cls, name: str, **overrides: Any):
        if name not in cls.NAMED_SIZES:
            raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(cls.NAMED_SIZES)}")
        return cls(**{**cls.NAMED_SIZES[name], **overrides})


_DEFAULT_MAX = 2**20
