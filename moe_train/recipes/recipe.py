"""The recipe: a typed, complete description of a fine-tuning job, one field per knob.

Each field carries its help text and the values it accepts (``knob``): this table is the one list of
knobs.  `moe-train train` and `moe-train plan` build their options from it (recipes/options.py), recipe
files and ``--cfg-options`` are checked by it (`problem`), and a test checks the TorchX components'
parameters against it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

from moe_train.models.common.experts import MOE_IMPLEMENTATIONS
from moe_train.models.common.lora import LORA_TARGETS
from moe_train.storage import redact_all

DTYPES = ("bf16", "fp32")  # bf16: bf16 weights, fp32 master copy, router and loss; fp32: everything fp32
# Names the layers above define, copied here so that a recipe is checked where it is built;
# tests/test_cli.py holds each equal to its source.
SHIPPED_DEEPSPEED = "deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload"  # engine/deepspeed_config.py
DATA_FORMATS = ("messages", "sharegpt", "alpaca", "text")  # data/formats.py FORMATS
TEMPLATES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "moonlight", "qwen3")  # data/templates.py TEMPLATES
REPORT_TO = ("tensorboard", "mlflow", "wandb")  # engine/tracking.py REPORT_TO


def knob(
    default: Any = MISSING,
    *,
    help: str,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    off_flag: str | None = None,
) -> Any:
    """A recipe field: its default, one line of help, and the values it accepts (inclusive bounds unless
    open; for a pair, each element's).  ``off_flag`` names a boolean's negative CLI flag when ``--no-x``
    would read wrong."""
    meta = dict(help=help, choices=choices, min=min, max=max, min_open=min_open, max_open=max_open, off_flag=off_flag)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Recipe:
    name: str = knob(help="Name of the recipe (a built-in's, see `moe-train recipes`).")
    description: str = knob(help="One line on what the recipe trains.")
    # Model
    model: str | None = knob(
        None, help="HF checkpoint directory or fsspec URL (hf://ORG/NAME reads the Hugging Face Hub in ranges)."
    )
    model_size: str | None = knob(None, help="Named size of the family, initialised from seed, when there is no model.")
    family: str = knob("deepseek_v2", help="model_type of the family's config.json, for model_size.")
    tokenizer: str | None = knob(
        None, help="Tokenizer directory or URL (none: the model's own; --model without --tokenizer also uses it)."
    )
    moe_implementation: str = knob(
        "shard",
        choices=MOE_IMPLEMENTATIONS,
        help="Routed experts stacked in shards, or one module per expert (the HF layout, a baseline).",
    )
    expert_in_one_shard: int | None = knob(None, min=1, help="Experts per shard; must divide the routed expert count.")
    # Data
    data: list[str] = knob(
        [],
        help="Training data: a file, directory, glob or URL of JSON, JSONL, Parquet, CSV or Arrow, or a Hub "
        "dataset hf://datasets/ORG/NAME[@REV][?subset=NAME&split=NAME].",
    )
    data_format: str | None = knob(
        None,
        choices=DATA_FORMATS,
        help="Record format of the data (messages, sharegpt, alpaca, text); none: detected per file from its columns.",
    )
    columns: dict[str, str] = knob(
        {}, help="Fields read from columns of other names, e.g. instruction=question,output=answer."
    )
    template: str | None = knob(
        None,
        choices=TEMPLATES,
        help="Chat template; none: the tokenizer's own, else the model family's.",
    )
    max_length: int = knob(8192, min=2, help="Tokens per packed sequence.")
    varlen: bool = knob(
        True,
        help="Attend only within each packed sample, or across the whole pack (XTuner's classic packing).",
    )
    too_long: str = knob("truncate", choices=("truncate", "drop"), help="What to do with a sample over max_length.")
    # Validation: separate data, or a fraction of the training packs held out
    eval_data: list[str] = knob([], help="Validation data (same formats as the training data).")
    eval_fraction: float = knob(
        0.0, min=0, max=1, max_open=True, help="Hold out this fraction of the training packs for validation."
    )
    eval_steps: int = knob(0, min=0, help="Validation loss every N steps (0: once, after the last step).")
    shuffle: bool = knob(True, help="Shuffle the packs every epoch (seeded).")
    # Optimisation (AdamW) and schedule (warm-up, then cosine)
    lr: float = knob(1e-5, min=0, min_open=True, help="Peak learning rate.")
    betas: tuple[float, float] = knob((0.9, 0.999), min=0, max=1, max_open=True, help="AdamW's betas.")
    weight_decay: float = knob(0.0, min=0, help="AdamW's weight decay.")
    max_grad_norm: float = knob(1.0, min=0, help="Clip the gradient norm to this (0: no clipping).")
    warmup_ratio: float = knob(0.03, min=0, max=1, max_open=True, help="Fraction of the schedule spent warming up.")
    min_lr_ratio: float = knob(0.0, min=0, max=1, help="Floor of the cosine schedule, a fraction of lr.")
    epochs: int = knob(3, min=1, help="Passes over the data.")
    max_steps: int | None = knob(
        None, min=1, help="Stop after this many optimiser steps (the LR schedule still spans the epochs)."
    )
    micro_batch_size: int = knob(1, min=1, help="Packed sequences per rank per micro step.")
    grad_accum: int = knob(16, min=1, help="Micro-batches per optimiser step.")
    dtype: str = knob(
        "bf16",
        choices=DTYPES,
        help="bf16 weights with an fp32 master copy, router and loss, or fp32 throughout.",
    )
    activation_checkpointing: bool = knob(True, help="Recompute each decoder layer's activations in the backward.")
    require_fast_kernels: bool = knob(
        True,
        off_flag="allow-slow-kernels",
        help="On CUDA, stop at start-up when attention or experts would take a slow fallback.",
    )
    sp: int = knob(1, min=1, help="Sequence-parallel degree (must divide the world size).")
    bias_update_rate: float = knob(
        0.001,
        min=0,
        help="DeepSeek V3 aux-loss-free balancing: each router's correction bias moves this much per step "
        "against its expert's load (0: off; other families ignore it).",
    )
    ep: int = knob(
        1,
        min=1,
        help="Expert-parallel degree: each group of N consecutive ranks splits the routed experts and "
        "exchanges tokens (must divide the world size and the expert count; ZeRO-3).",
    )
    hold_experts: bool = knob(
        False,
        help="With --ep: keep each rank's routed experts gathered from their layer's forward to the optimizer "
        "step, one all-gather per layer and step instead of two per layer and micro step; costs their full weights "
        "in memory (moe-train plan says whether they fit).",
    )
    # LoRA (rank 0: full fine-tuning)
    lora_rank: int = knob(
        0,
        min=0,
        help="LoRA rank: train only low-rank adapters on a frozen base (no fp32 master, no optimizer state for "
        "it); 0: full fine-tuning.",
    )
    lora_alpha: float = knob(
        16.0, min=0, min_open=True, help="LoRA alpha: the adapters' update is scaled by alpha / rank."
    )
    lora_dropout: float = knob(
        0.0,
        min=0,
        max=1,
        max_open=True,
        help="Dropout on the input of the attention, dense and shared-expert adapters.",
    )
    lora_targets: list[str] = knob(
        list(LORA_TARGETS),
        choices=LORA_TARGETS,
        help="What gets adapters: any of attention, dense, shared_experts, experts (comma separated); the router "
        "stays frozen.",
    )
    # Tracking
    report_to: list[str] = knob(
        ["tensorboard"],
        choices=REPORT_TO,
        help="Where the metrics go besides the work dir's JSONL: any of tensorboard, mlflow, wandb (comma separated).",
    )
    # Checkpoints
    save_steps: int = knob(50, min=0, help="Save a training checkpoint every N steps (0: never).")
    save_total_limit: int = knob(2, min=0, help="Complete checkpoints kept in the work dir (0: all).")
    seed: int = knob(0, min=0, help="Seed for the data order and seeded initialisation.")
    deepspeed: str = knob(
        "deepspeed_zero3", help=f"DeepSpeed config: a shipped name ({SHIPPED_DEEPSPEED}) or a JSON path."
    )

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = coerce(name, getattr(self, name))
            setattr(self, name, value)
            wrong = problem(name, value)
            if wrong:
                raise ValueError(
                    f"recipe {self.name}: {name}={value!r} {wrong}; set {name} in the recipe file or with "
                    f"--cfg-options {name}=VALUE"
                )

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Recipe)}
_HINTS = typing.get_type_hints(Recipe)
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def optional_type(name: str) -> tuple[Any, bool]:
    """(the field's type, whether it may be None): ``int | None`` -> (int, True)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def describe(name: str) -> str:
    """What a field takes, in words: ``an integer``, ``a list of strings``, ``a string or none`` ..."""
    kind, optional = optional_type(name)
    if typing.get_origin(kind) is list:
        text = f"a list of {_WORDS[typing.get_args(kind)[0]].removeprefix('a ')}s"
    elif typing.get_origin(kind) is dict:
        text = "a mapping of strings to strings"
    elif typing.get_origin(kind) is tuple:
        text = f"a list of {len(typing.get_args(kind))} numbers"
    else:
        text = _WORDS[kind]
    return text + (" or none" if optional else "")


def coerce(name: str, value: Any) -> Any:
    """The lossless conversions a file or the command line needs: a list for a pair (JSON and YAML have no
    tuples), one path for a list of paths."""
    kind, _ = optional_type(name)
    if typing.get_origin(kind) is tuple and isinstance(value, list):
        return tuple(value)
    if typing.get_origin(kind) is list and isinstance(value, str):
        # a list of names (report_to) is written comma separated; a list of paths is one path
        return [v.strip() for v in value.split(",")] if FIELDS[name].metadata["choices"] else [value]
    return value


def unknown_key(key: str, names: list[str]) -> str:
    """``unknown key 'lrr' (did you mean 'lr'?)``."""
    near = difflib.get_close_matches(key, names, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")


def _is(value: Any, kind: Any) -> bool:
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _bounds(meta: Any) -> str:
    lo = f"{'>' if meta['min_open'] else '>='} {meta['min']:g}" if meta["min"] is not None else ""
    hi = f"{'<' if meta['max_open'] else '<='} {meta['max']:g}" if meta["max"] is not None else ""
    return " and ".join(b for b in (lo, hi) if b)


def _in_range(x: float, meta: Any) -> bool:
    lo, hi = meta["min"], meta["max"]
    above = lo is None or x > lo or (x == lo and not meta["min_open"])
    return above and (hi is None or x < hi or (x == hi and not meta["max_open"]))


def problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``name`` (type, choices, range), or None: the one check
    of built-in recipes, recipe files and ``--cfg-options``."""
    meta = FIELDS[name].metadata
    kind, optional = optional_type(name)
    if value is None:
        return None if optional else f"is not set; give {describe(name)}"
    origin = typing.get_origin(kind)
    if origin is list:
        ok, numbers = isinstance(value, list) and all(_is(v, typing.get_args(kind)[0]) for v in value), []
    elif origin is dict:
        ok, numbers = isinstance(value, dict) and all(isinstance(x, str) for kv in value.items() for x in kv), []
    elif origin is tuple:
        kinds = typing.get_args(kind)
        ok = isinstance(value, tuple) and len(value) == len(kinds) and all(map(_is, value, kinds))
        numbers = list(value) if ok else []
    else:
        ok, numbers = _is(value, kind), [value] if kind in (int, float) else []
    if not ok:
        return f"is not {describe(name)}"
    texts = value if origin is list else [value] if kind is str else []
    if name != "description" and any(not t.strip() for t in texts):
        return "is empty (an unset shell variable?); give a path, URL or name"
    if meta["choices"] is not None and any(v not in meta["choices"] for v in (value if origin is list else [value])):
        allowed = list(meta["choices"])
        return f"has a value not in {allowed}" if origin is list else f"is not one of {allowed}"
    if not all(math.isfinite(x) for x in numbers):
        return "is not a finite number"
    if not all(_in_range(x, meta) for x in numbers):
        return f"is out of range: it must be {_bounds(meta)}"
    return None


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a run stores it (recipe.json, each checkpoint's state.json): JSON types, every
    string redacted (URL user-info and secret query parameters, in any field)."""
    record = redact_all(dataclasses.asdict(recipe))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}
