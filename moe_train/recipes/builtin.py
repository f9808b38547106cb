"""The shipped recipes: the seed's full fine-tunes of the DeepSeek V2 and V3 families, Qwen3-MoE's, LoRA on
DeepSeek V2 and Qwen3-MoE, and the tiny debug recipes every test and the smoke run use (`moe-train recipes`
lists them; `moe-train recipes --dump NAME` writes one as a file to start from)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from moe_train.recipes.recipe import Recipe

ASSETS = resources.files("moe_train") / "assets"

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

_QWEN3_ALPACA = {**_V2_CHAT_ALPACA, "family": "qwen3_moe", "template": "qwen3"}

# LoRA on every target (attention, dense and shared-expert MLPs, routed experts) of the frozen base: rank 16,
# alpha 32, and the higher learning rate adapters train with (only they are updated).
_LORA = dict(lora_rank=16, lora_alpha=32.0, lr=2e-4)

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
            name="qwen3_30b_a3b_full_alpaca",
            description="Qwen3-30B-A3B full fine-tune on alpaca with Qwen3's chat template, shards of 64 experts "
            "(moe-train plan's pick on 8 x 80 GB), 3 epochs",
            model="hf://Qwen/Qwen3-30B-A3B",
            moe_implementation="shard",
            expert_in_one_shard=64,
            **_QWEN3_ALPACA,
        ),
        Recipe(
            name="qwen3_235b_a22b_full_alpaca",
            description="Qwen3-235B-A22B full fine-tune on alpaca with Qwen3's chat template, EP 8 with shards of "
            "16 experts (moe-train plan --search's pick on 64 x 80 GB), 3 epochs",
            model="hf://Qwen/Qwen3-235B-A22B",
            moe_implementation="shard",
            expert_in_one_shard=16,
            ep=8,
            **_QWEN3_ALPACA,
        ),
        Recipe(
            name="deepseek_v2_chat_lora_alpaca_e3",
            description="DeepSeek-V2-Chat (236B) LoRA (rank 16, experts included) on alpaca, 3 epochs, planned for "
            "16 x A100-80G: expert parallel 16, shards of 5 experts (moe-train plan --search; the full run needs 64)",
            model="hf://deepseek-ai/DeepSeek-V2-Chat",
            moe_implementation="shard",
            expert_in_one_shard=5,
            ep=16,
            **{**_V2_CHAT_ALPACA, **_LORA},
        ),
        Recipe(
            name="deepseek_v2_lite_chat_lora_alpaca_e3",
            description="DeepSeek-V2-Lite-Chat (16B) LoRA (rank 16, experts included) on alpaca, shards of 8 experts, "
            "3 epochs",
            model="hf://deepseek-ai/DeepSeek-V2-Lite-Chat",
            moe_implementation="shard",
            expert_in_one_shard=8,
            **{**_V2_CHAT_ALPACA, **_LORA},
        ),
        Recipe(
            name="qwen3_30b_a3b_lora_alpaca",
            description="Qwen3-30B-A3B LoRA (rank 16, experts included) on alpaca with Qwen3's chat template, shards "
            "of 64 experts, 3 epochs",
            model="hf://Qwen/Qwen3-30B-A3B",
            moe_implementation="shard",
            expert_in_one_shard=64,
            **{**_QWEN3_ALPACA, **_LORA},
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
            name="tiny_qwen3",
            description="Qwen3-MoE debug model (GQA with q/k norms, softmax router, a dense first layer) initialised "
            "from seed, on the alpaca sample shipped in the repo (CPU smoke run)",
            family="qwen3_moe",
            model_size="tiny",
            tokenizer=str(ASSETS / "tiny_tokenizer"),
            moe_implementation="shard",
            expert_in_one_shard=4,
            data=[str(ASSETS / "alpaca_sample.jsonl")],
            template="qwen3",  # not the tokenizer's own (V2-style): the export ships this one
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


@dataclass(frozen=True)
class Cluster:
    """What a planned recipe was planned for: `moe-train plan --search` on this many GPUs of this kind."""

    based_on: str  # the recipe whose training run (global batch, numerics) it keeps
    gpus: int
    gpu: str  # `moe-train plan --gpu`
    gpu_mem_gb: float
    preset: str  # its TorchX component in components/components.py


# Recipes beside the seed's, named for the cluster they were planned for: the same training run as
# ``based_on`` in the planner's fastest configuration that fits there with 10% of the memory free
# (tests/test_plan.py holds each within 10% of the planner's best, so a planner change moves them).
PLANNED: dict[str, Cluster] = {
    "deepseek_v2_chat_full_alpaca_e3_64xa100": Cluster(
        "deepseek_v2_chat_full_alpaca_e3", 64, "a100", 80, "deepseek_v2_full_64xa100"
    ),
    "deepseek_v3_full_alpaca_e3_256xa100": Cluster(
        "deepseek_v3_full_alpaca_e3", 256, "a100", 80, "deepseek_v3_full_256xa100"
    ),
}


def _planned(name: str, description: str, **configuration: object) -> Recipe:
    cluster = PLANNED[name]
    return RECIPES[cluster.based_on].replace(name=name, description=description, **configuration)


RECIPES.update(
    (r.name, r)
    for r in [
        _planned(
            "deepseek_v2_chat_full_alpaca_e3_64xa100",
            "DeepSeek-V2-Chat (236B) on alpaca, the seed's training run planned for 64 x A100-80G: expert "
            "parallel 16, shards of 5 experts (moe-train plan --search)",
            ep=16,
            expert_in_one_shard=5,
        ),
        _planned(
            "deepseek_v3_full_alpaca_e3_256xa100",
            "DeepSeek-V3 (671B) on alpaca, the shipped V3 training run planned for 256 x A100-80G: expert "
            "parallel 8, shards of 32 experts, packs of 4096 tokens at half the grad_accum (moe-train plan --search)",
            ep=8,
            expert_in_one_shard=32,
            max_length=4096,
            grad_accum=8,
        ),
    ]
)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))} (see `moe-train recipes`)")
    return RECIPES[name]
