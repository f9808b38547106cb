"""Training recipes: typed, named, complete descriptions of a fine-tuning job.

A recipe fixes the model, data, sequence handling, optimiser and schedule.  The CLI may override
single fields (``--lr``, ``--max-length`` ...) or any field with ``--cfg-options key=value``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

ASSETS = resources.files("moe_train") / "assets"
DTYPES = ("bf16", "fp32")  # bf16: bf16 weights, fp32 master copy, router and loss; fp32: everything fp32


@dataclass
class Recipe:
    name: str
    description: str
    # Model: a HF checkpoint directory or fsspec URL (hf://org/name: the Hugging Face Hub through
    # huggingface_hub's fsspec filesystem, read in ranges), or a named size of `family` initialised from `seed`.
    model: str | None = None
    model_size: str | None = None
    family: str = "deepseek_v2"  # the model_type of the family's config.json (for model_size)
    tokenizer: str | None = None  # defaults to the model directory
    moe_implementation: str = "shard"
    expert_in_one_shard: int | None = None
    # Data: paths, URLs or Hub datasets (hf://datasets/ORG/NAME[@REV][?subset=..&split=..]) of alpaca,
    # messages, ShareGPT or text records in JSON, JSONL, Parquet, CSV or Arrow (moe_train/data/sources.py).
    data: list[str] = field(default_factory=list)
    data_format: str | None = None  # alpaca, messages, sharegpt or text; None: detected per source from its columns
    columns: dict[str, str] = field(default_factory=dict)  # a field's column of another name, e.g. {"output": "answer"}
    # Chat template (moe_train/data/templates.py): a shipped name; None: the tokenizer's own, else the family's.
    template: str | None = None
    max_length: int = 8192
    varlen: bool = True
    too_long: str = "truncate"  # or "drop": what to do with a sample longer than max_length
    # Validation: separate data, or a fraction of the training packs held out; every eval_steps steps
    # (0: once, at the end) when either is set.
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0
    eval_steps: int = 0
    shuffle: bool = True
    # Optimisation (AdamW)
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    epochs: int = 3
    max_steps: int | None = None  # stop early; the LR schedule still spans `epochs`
    micro_batch_size: int = 1  # packed sequences per rank per micro step
    grad_accum: int = 16
    dtype: str = "bf16"  # bf16 on GPU; the trainer always uses fp32 on CPU
    activation_checkpointing: bool = True
    require_fast_kernels: bool = True  # on CUDA, refuse to run with a slow attention or expert fallback
    sp: int = 1
    # Aux-loss-free balancing (DeepSeek V3 family): after each step every router's correction bias moves
    # by this much against its expert's load (V3's gamma); 0 disables; other families ignore it.
    bias_update_rate: float = 0.001
    ep: int = 1  # expert-parallel degree (moe_train/parallel/expert.py); not the HF config's ep_size
    # Checkpoints
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 0
    deepspeed: str = "deepspeed_zero3"

    def __post_init__(self) -> None:
        choices = {"dtype": DTYPES, "too_long": ("truncate", "drop")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"recipe {self.name}: {name}={getattr(self, name)!r} is not one of {list(allowed)}; "
                    f"set --cfg-options {name}=... to one of them"
                )

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


ALPACA = "hf://datasets/tatsu-lab/alpaca"  # the seed's data (XTuner's alpaca config): Parquet on the Hub

_V2_CHAT_ALPACA = dict(
    data=[ALPACA],
    template="deepseek_v2",
    lr=1e-5,
    betas=(0.9, 0.999),
    weight_decay=0.0,
    max_grad_norm=1.0,
    warmup_ratio=0.03,
    epochs=3,
    dtype="bf16",
    save_steps=50,
    save_total_limit=2,
    grad_accum=16,
    max_length=2048,
    varlen=True,
    activation_checkpointing=True,
)

_V3_ALPACA = {**_V2_CHAT_ALPACA, "family": "deepseek_v3", "bias_update_rate": 0.001}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            name="deepseek_v2_chat_full_alpaca_e3",
            description="DeepSeek-V2-Chat (236B) full fine-tune on alpaca, shards of 10 experts, 3 epochs",
            model="hf://deepseek-ai/DeepSeek-V2-Chat",
            moe_implementation="shard",
            expert_in_one_shard=10,
            **_V2_CHAT_ALPACA,
        ),
        Recipe(
            name="deepseek_v2_lite_chat_full_alpaca_e3",
            description="DeepSeek-V2-Lite-Chat (16B) full fine-tune on alpaca, shards of 8 experts, 3 epochs",
            model="hf://deepseek-ai/DeepSeek-V2-Lite-Chat",
            moe_implementation="shard",
            expert_in_one_shard=8,
            **_V2_CHAT_ALPACA,
        ),
        Recipe(
            name="deepseek_v2_chat_full_alpaca_e3_32k_varlen",
            description="DeepSeek-V2-Chat (236B) on alpaca packed to 32k tokens with varlen attention",
            model="hf://deepseek-ai/DeepSeek-V2-Chat",
            moe_implementation="shard",
            expert_in_one_shard=10,
            **{**_V2_CHAT_ALPACA, "max_length": 32768, "grad_accum": 1},
        ),
        Recipe(
            name="deepseek_v3_full_alpaca_e3",
            description="DeepSeek-V3 (671B, FP8 weights dequantised on load) full fine-tune on alpaca, shards of "
            "128 experts (moe-train plan's pick on 256 x 80 GB, the smallest cluster that fits), 3 epochs",
            model="hf://deepseek-ai/DeepSeek-V3",
            moe_implementation="shard",
            expert_in_one_shard=128,
            **{**_V3_ALPACA, "template": "deepseek_v3"},
        ),
        Recipe(
            name="moonlight_16b_full_alpaca_e3",
            description="Moonlight-16B-A3B-Instruct (DeepSeek V3 architecture) full fine-tune on alpaca, shards of "
            "8 experts (moe-train plan's pick on 8 x 80 GB), 3 epochs",
            model="hf://moonshotai/Moonlight-16B-A3B-Instruct",
            moe_implementation="shard",
            expert_in_one_shard=8,
            **{**_V3_ALPACA, "template": "moonlight"},
        ),
        Recipe(
            name="tiny_v3",
            description="DeepSeek V3 debug model (noaux_tc router, correction bias) initialised from seed, on the "
            "alpaca sample shipped in the repo (CPU smoke run)",
            family="deepseek_v3",
            model_size="tiny-v3",
            tokenizer=str(ASSETS / "tiny_tokenizer"),
            moe_implementation="shard",
            expert_in_one_shard=4,
            data=[str(ASSETS / "alpaca_sample.jsonl")],
            template="deepseek_v3",  # not the tokenizer's own (V2-style): the export ships this one
            max_length=256,
            varlen=True,
            lr=3e-3,
            warmup_ratio=0.1,
            epochs=1,
            max_steps=20,
            grad_accum=1,
            dtype="fp32",
            activation_checkpointing=False,
            save_steps=10,
            save_total_limit=2,
            bias_update_rate=0.001,
        ),
        Recipe(
            name="tiny",
            description="debug model initialised from seed, on the alpaca sample shipped in the repo (CPU smoke run)",
            model_size="tiny",
            tokenizer=str(ASSETS / "tiny_tokenizer"),
            moe_implementation="shard",
            expert_in_one_shard=4,
            data=[str(ASSETS / "alpaca_sample.jsonl")],
            max_length=256,
            varlen=True,
            lr=3e-3,
            warmup_ratio=0.1,
            epochs=1,
            max_steps=20,
            grad_accum=1,
            dtype="fp32",
            activation_checkpointing=False,
            save_steps=10,
            save_total_limit=2,
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))} (see `moe-train recipes`)")
    return RECIPES[name]


# The TorchX catalogue (components/components.py) imports nothing but TorchX, yet shows the recipe's model
# and data in the job it describes: it keeps a copy of these facts, which `python -m moe_train.recipes`
# rewrites and tests/test_launch.py holds equal to the recipes.
FACTS_BEGIN = "# BEGIN recipe facts"
FACTS_END = "# END recipe facts"


def component_facts() -> dict[str, dict[str, Any]]:
    """Model and data of every recipe that names a checkpoint (the full-size ones)."""
    return {name: {"model": r.model, "data": list(r.data)} for name, r in sorted(RECIPES.items()) if r.model}


def facts_block() -> str:
    lines = [
        f"{FACTS_BEGIN}: generated from moe_train/recipes.py by `python -m moe_train.recipes`; a test keeps it "
        "current.",
        "_RECIPE_FACTS: Dict[str, Dict[str, object]] = {",
    ]
    for name, facts in component_facts().items():  # one key a line, trailing commas: as ruff formats it
        lines += [
            f"    {json.dumps(name)}: {{",
            *(f"        {json.dumps(k)}: {json.dumps(v)}," for k, v in facts.items()),
        ]
        lines.append("    },")
    return "\n".join([*lines, "}", FACTS_END])


def write_facts(path: str) -> bool:
    """Rewrite the facts block of the catalogue at ``path``; True when it changed."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(FACTS_BEGIN), text.index(FACTS_END) + len(FACTS_END)
    new = text[:start] + facts_block() + text[end:]
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import pathlib

    catalogue = pathlib.Path(__file__).resolve().parents[1] / "components" / "components.py"
    print(f"{catalogue}: {'updated' if write_facts(str(catalogue)) else 'already current'}")
