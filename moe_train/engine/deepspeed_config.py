"""DeepSpeed JSON configs: the shipped ones by name, checked on load, and the trainer's "auto" values.

Shipped in ``moe_train/configs``:

- ``deepspeed_zero2``: optimizer state and gradients partitioned, full parameters on every rank.
- ``deepspeed_zero3``: parameters partitioned too; the default for the MoE models.
- ``deepspeed_zero3_offload``: ZeRO-3 with optimizer state and parameters kept in host memory.
  DeepSpeed then insists on its own CPU Adam (``deepspeed.ops.adam.DeepSpeedCPUAdam``, a C++ op
  built on first use unless the image pre-built it); ``offloads_optimizer`` tells the trainer.

Values the trainer owns are "auto" in the JSON and filled by ``fill_auto`` from the recipe. The
bucket sizes follow the hidden size h: reduce ``h*h``, ZeRO-3 prefetch ``0.9*h*h``, and
parameters under ``10*h`` elements (norms, biases) stay whole on every rank. Both ZeRO-3 configs
leave ``stage3_gather_16bit_weights_on_model_save`` off: the HF export gathers the weights itself.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

CONFIG_DIR = resources.files("moe_train") / "configs"
ZERO_STAGES = (0, 1, 2, 3)
# Keys the trainer decides: an explicit value in the JSON must agree with the recipe.
_TRAINER_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
)


def shipped_configs() -> list[str]:
    """Names of the configs in ``moe_train/configs`` (``deepspeed_zero3`` ...)."""
    return sorted(
        f.name.removesuffix(".json")
        for f in CONFIG_DIR.iterdir()
        if f.name.startswith("deepspeed_") and f.name.endswith(".json")
    )


def load_deepspeed_config(name_or_path: str) -> dict[str, Any]:
    """Read a shipped config by name, or any DeepSpeed JSON file by path; check its ZeRO stage."""
    names = shipped_configs()
    if name_or_path in names:
        source: Any = CONFIG_DIR / f"{name_or_path}.json"
    elif name_or_path.endswith(".json") or "/" in name_or_path:
        source = Path(name_or_path)
    else:
        raise ValueError(
            f"unknown DeepSpeed config {name_or_path!r}; shipped: {', '.join(names)} (or give the path of a .json file)"
        )
    try:
        text = source.read_text()
    except OSError as err:
        raise ValueError(f"cannot read DeepSpeed config {source}: {err.strerror or err}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {source} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {source} must hold a JSON object, not {type(cfg).__name__}")
    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict):
        raise ValueError(f'DeepSpeed config {source} has no zero_optimization section; add one with "stage": 2 or 3')
    stage = zero.get("stage")
    if type(stage) is not int or stage not in ZERO_STAGES:
        raise ValueError(
            f"DeepSpeed config {source}: zero_optimization.stage must be one of "
            f"{', '.join(map(str, ZERO_STAGES))}, got {stage!r}"
        )
    return cfg


def auto_buckets(hidden_size: int) -> dict[str, int]:
    """The ZeRO bucket sizes "auto" stands for, from the hidden size (also what the planner assumes)."""
    return {
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }


def fill_auto(
    cfg: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float | None,
    bf16: bool,
    hidden_size: int,
) -> dict[str, Any]:
    """A copy of ``cfg`` with every "auto" replaced by the trainer's value.

    Raises ValueError naming any "auto" it has no value for, and any explicit batch size, clipping
    or bf16 setting that disagrees with the trainer's. Explicit bucket sizes are kept as tuning.
    """
    values: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip or 0.0),  # 0 turns clipping off
        "bf16.enabled": bool(bf16),
        **auto_buckets(hidden_size),
    }
    filled = copy.deepcopy(cfg)
    unfilled: list[str] = []
    conflicts: list[str] = []

    def visit(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = prefix + key
            if isinstance(value, dict):
                visit(value, path + ".")
            elif value == "auto":
                if path in values:
                    node[key] = values[path]
                else:
                    unfilled.append(path)
            elif path in _TRAINER_KEYS and value != values[path]:
                conflicts.append(f"{path}={value!r} (trainer: {values[path]!r})")

    visit(filled, "")
    if unfilled:
        raise ValueError(
            f'cannot fill "auto" for {", ".join(unfilled)} in the DeepSpeed config; give a value there instead'
        )
    if conflicts:
        raise ValueError(
            f"DeepSpeed config disagrees with the recipe on {'; '.join(conflicts)}; "
            'set these to "auto" or change the recipe'
        )
    return filled


def offloads(cfg: dict[str, Any], what: str) -> bool:
    """Whether ZeRO keeps ``what`` ("optimizer" or "param") in host memory or on NVMe."""
    device = (cfg.get("zero_optimization", {}).get(f"offload_{what}") or {}).get("device", "none")
    return device not in (None, "none")


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    """Whether ZeRO keeps the optimizer state off the device (then the trainer uses DeepSpeedCPUAdam)."""
    return offloads(cfg, "optimizer")
