"""What a user books from a plan: time per epoch and for the run, GPU-hours, the command to paste, the
Slurm time limit with a margin, and on a no-fit the smallest changes that fit.

Time is tokens over throughput: an epoch's tokens / (predicted TGS x GPUs), the run ``epochs`` of them.
The tokens come from ``--tokens`` or, for the shipped alpaca recipes, from the alpaca length distribution
the speed model already assumes (``calibration.ALPACA_*``), labelled as such.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

from moe_train.plan import build_plan, calibration
from moe_train.recipes import RECIPES, Recipe
from moe_train.recipes.builtin import ALPACA, PLANNED

GPUS_PER_NODE = 8
# A Slurm time limit is the predicted run times this margin plus start-up (loading a 236B checkpoint,
# tokenising, the first save): the prediction is a model, and a run killed at its limit loses its last steps.
TIME_MARGIN = 1.5
STARTUP_S = 3600
# The TorchX presets of the full-size recipes (components/components.py) and the cluster each books.
PRESETS = {
    "deepseek_v2_chat_full_alpaca_e3": ("deepseek_v2_full", 64),
    "deepseek_v3_full_alpaca_e3": ("deepseek_v3_full", 256),
    **{name: (c.preset, c.gpus) for name, c in PLANNED.items()},
}


def alpaca_tokens() -> int:
    """Tokens in alpaca (52,002 samples) under the calibration's log-normal sample lengths: an estimate."""
    mean = math.exp(math.log(calibration.ALPACA_LOG_MEDIAN_TOKENS) + calibration.ALPACA_LOG_SIGMA**2 / 2)
    return round(calibration.ALPACA_SAMPLES * mean)


def data_tokens(recipe: Recipe, tokens: int | None) -> tuple[int | None, str]:
    """(tokens per epoch, where the figure comes from)."""
    if tokens:
        return tokens, "--tokens"
    if list(recipe.data) == [ALPACA]:
        return alpaca_tokens(), "alpaca, estimated from its sample-length distribution; --tokens N for a count"
    return None, "unknown: pass --tokens N (the data's token count)"


@dataclass
class Booking:
    tokens: int
    epochs: int
    global_batch: int  # tokens per optimizer step
    tgs: float
    gpus: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.tokens / self.global_batch)

    @property
    def epoch_s(self) -> float:
        return self.tokens / (self.tgs * self.gpus)

    @property
    def run_s(self) -> float:
        return self.epochs * self.epoch_s

    @property
    def gpu_hours(self) -> float:
        return self.run_s * self.gpus / 3600

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_epoch": self.tokens,
            "epochs": self.epochs,
            "global_batch_tokens": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_s": round(self.epoch_s, 1),
            "run_s": round(self.run_s, 1),
            "gpu_hours": round(self.gpu_hours, 1),
            "slurm_time": slurm_time(self.run_s),
        }


def slurm_time(run_s: float) -> str:
    """The Slurm time limit (D-HH:MM:SS) for a run predicted at ``run_s``: margin and start-up, whole hours."""
    hours = math.ceil((run_s * TIME_MARGIN + STARTUP_S) / 3600)
    return f"{hours // 24}-{hours % 24:02d}:00:00"


def duration(s: float) -> str:
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h" if s < 3 * 86400 else f"{s / 86400:.1f} days"


def commands(recipe: str, gpus: int, changes: dict[str, Any], run_s: float | None) -> dict[str, str]:
    """The TorchX line and the srun line that launch ``recipe`` on ``gpus`` with ``changes`` (recipe fields)."""
    nodes, per_node = max(1, gpus // GPUS_PER_NODE), min(gpus, GPUS_PER_NODE)
    component = {"deepspeed", "max_length", "ep", "sp", "expert_in_one_shard", "moe_implementation"}
    preset = PRESETS.get(recipe)
    torchx = ["torchx", "run", "-s", "slurm"]
    if run_s is not None:
        torchx += ["-cfg", f"time={slurm_time(run_s)}"]
    if preset:
        torchx += [f"components.py:{preset[0]}"] + ([] if preset[1] == gpus else ["-j", f"{nodes}x{per_node}"])
    else:
        torchx += ["components.py:train", "--recipe", recipe, "-j", f"{nodes}x{per_node}"]
    flags = {"hold_experts"}  # ``moe-train train`` flags the lines spell as such (the TorchX component has none)
    trainer = []
    for k, v in changes.items():
        if k in component:
            torchx += [f"--{k}", str(v)]
        elif k in flags:
            trainer.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        else:
            trainer += ["--cfg-options", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    if trainer:
        torchx += ["--", *trainer]
    srun = ["srun", "-N", str(nodes), "--ntasks-per-node", str(per_node), "--gpus-per-task", "1"]
    srun += ["moe-train", "train", recipe, "--launcher", "slurm"]
    for k, v in changes.items():
        if k in component:
            srun += [f"--{k.replace('_', '-')}", str(v)]
    srun += trainer
    return {"torchx": "cd components && " + shlex.join(torchx), "srun": shlex.join(srun)}


def planned_for(recipe: str) -> list[str]:
    """The planned recipes that keep ``recipe``'s training run."""
    return [name for name, c in PLANNED.items() if c.based_on == recipe and name in RECIPES]


def preset_run_s(recipe: str) -> float:
    """Predicted time of a whole run of a preset's recipe on its preset's GPUs (A100-80G, alpaca)."""
    r = RECIPES[recipe]
    gpus = PRESETS[recipe][1]
    p = build_plan(r, gpus, 80, nodes=gpus // GPUS_PER_NODE, device="a100")
    tokens, _ = data_tokens(r, None)
    return Booking(tokens, r.epochs, gpus * p.work.tokens_per_rank * r.grad_accum, p.speed.tgs, gpus).run_s


def presets_time_limit() -> tuple[str, str]:
    """(the Slurm time limit that covers every full-size preset's predicted run, the slowest preset's recipe)."""
    slowest = max(PRESETS, key=preset_run_s)
    return slurm_time(preset_run_s(slowest)), slowest
