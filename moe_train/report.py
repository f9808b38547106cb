"""``moe-train report WORK_DIR``: PNG plots and a one-page report.md of a run, local or on an object store.

Only reads the work dir (metrics segments, recipe.json, deepspeed.json, summary.json), so it works on
a live run and never takes the run's lease.  Figures:

* ``loss.png``         training loss per step and validation loss
* ``lr.png``           learning rate
* ``grad_norm.png``    gradient norm before clipping (log scale)
* ``throughput.png``   tokens per GPU per second, and MFU when the device's peak is known
* ``expert_load.png``  one row per MoE layer, one column per step: the busiest expert's tokens over the
                       mean tokens per expert (1 = balanced; a collapsed router approaches experts / top_k)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from moe_train.engine.metrics import read_metrics
from moe_train.run_dir import RunDir

FIGSIZE, DPI = (9.0, 4.0), 100  # every PNG is 900 x 400 pixels


def load_run(work_dir: str) -> dict[str, Any]:
    """Everything the report shows, read from ``work_dir``."""
    run = RunDir(work_dir)
    records = read_metrics(run, segments=True)
    steps = [r for r in records if "loss" in r and "event" not in r]
    if not steps:
        raise ValueError(
            f"{run.where} has no metrics yet (metrics/segment-*.jsonl); pass the work dir of a "
            "run that has trained at least one step"
        )
    segments = [r for r in records if r.get("event") == "segment"]
    return {
        "work_dir": run.where,
        "steps": steps,
        "evals": [r for r in records if r.get("event") == "eval"],
        "segments": segments,
        "recipe": run.read_json(run.recipe) or {},
        "deepspeed": run.read_json(run.deepspeed) or {},
        "summary": current_summary(run, segments),
    }


def current_summary(run: RunDir, segments: list[dict[str, Any]]) -> dict[str, Any] | None:
    """summary.json, unless a holder of an older lease generation than the newest segment's wrote it
    (a stale holder's late write after a takeover): then None, with one line."""
    summary = run.read_json(run.summary)
    stamps = [s.get("generation", 0) for s in segments]
    newest = max((g for g in stamps if type(g) is int), default=0)
    written = summary.get("generation", 0) if isinstance(summary, dict) else 0
    if type(written) is int and written < newest:
        print(
            f"Warning: {run.display(run.summary)} was written under lease generation {written}, older than the "
            f"newest segment's {newest} (a stale holder's late write); ignored",
            file=sys.stderr,
        )
        return None
    return summary


def expert_load_matrix(steps: list[dict[str, Any]]) -> Any:
    """(MoE layers, steps) busiest-expert load over the mean; NaN where a step has no figure."""
    import numpy as np

    layers = max((len(r.get("expert_load") or []) for r in steps), default=0)
    out = np.full((layers, len(steps)), np.nan)
    for j, r in enumerate(steps):
        for i, layer in enumerate(r.get("expert_load") or []):
            mean = layer.get("mean")
            if mean:
                out[i, j] = layer["max"] / mean
    return out


def _figure(title: str, ylabel: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot(run: dict[str, Any], out: str) -> dict[str, str]:
    """Write the PNGs into the local directory ``out``; their paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import LogNorm

    steps, evals = run["steps"], run["evals"]
    x = [r["step"] for r in steps]
    paths = {}

    fig, ax = _figure("Loss (token-weighted cross entropy)", "loss (nats per token)")
    ax.plot(x, [r["loss"] for r in steps], lw=1.2, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=4, label="validation")
    ax.legend()
    paths["loss"] = _save(fig, os.path.join(out, "loss.png"))

    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(x, [r["lr"] for r in steps], lw=1.2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    paths["lr"] = _save(fig, os.path.join(out, "lr.png"))

    fig, ax = _figure("Gradient norm (before clipping)", "global L2 norm")
    norms = [(r["step"], r["grad_norm"]) for r in steps if r.get("grad_norm")]
    if norms:
        from matplotlib.ticker import FuncFormatter

        ax.plot([n[0] for n in norms], [n[1] for n in norms], lw=1.2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    paths["grad_norm"] = _save(fig, os.path.join(out, "grad_norm.png"))

    fig, ax = _figure("Throughput", "tokens per GPU per second (TGS)")
    ax.plot(x, [r["tgs"] for r in steps], lw=1.2, color="tab:blue", label="TGS")
    mfu = [(r["step"], 100 * r["mfu"]) for r in steps if r.get("mfu")]
    if mfu:
        right = ax.twinx()
        right.plot([m[0] for m in mfu], [m[1] for m in mfu], lw=1.0, color="tab:orange", label="MFU")
        right.set_ylabel("MFU (% of dense bf16 peak)")
    ax.set_ylim(bottom=0)
    paths["throughput"] = _save(fig, os.path.join(out, "throughput.png"))

    load = expert_load_matrix(steps)
    fig, ax = _figure("Expert load: busiest expert's tokens / mean tokens per expert", "MoE layer (1 = first)")
    if load.size:
        import numpy as np

        seen = load[np.isfinite(load)]
        hi = max(2.0, float(seen.max()) if seen.size else 2.0)
        image = ax.imshow(
            load,
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            origin="lower",
            norm=LogNorm(vmin=1.0, vmax=hi),
            extent=(x[0] - 0.5, x[-1] + 0.5, -0.5, load.shape[0] - 0.5),
        )
        ax.set_yticks(range(load.shape[0]))
        ax.set_yticklabels([f"{i + 1}" for i in range(load.shape[0])])
        ax.grid(False)
        bar = fig.colorbar(image, ax=ax, label="max / mean (1 = balanced, log scale)")
        from matplotlib.ticker import FuncFormatter

        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v in (1.5, 2, 3, 5, 7) else ""))
    paths["expert_load"] = _save(fig, os.path.join(out, "expert_load.png"))
    return paths


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return "-" if v is None else str(v)


def markdown(run: dict[str, Any], figures: dict[str, str]) -> str:
    steps, evals, recipe, heads = run["steps"], run["evals"], run["recipe"], run["segments"]
    head = heads[-1] if heads else {}
    tgs = [r["tgs"] for r in steps]
    step_time = [r["step_time"] for r in steps if "step_time" in r]
    mfu = [r["mfu"] for r in steps if r.get("mfu")]
    zero = run["deepspeed"].get("zero_optimization", {})
    lines = [
        f"# Run report: {recipe.get('name', 'moe-train run')}",
        "",
        f"Work dir `{run['work_dir']}`: {len(steps)} steps in {len(heads)} segment(s), "
        f"last step {steps[-1]['step']}" + (" (finished)" if run["summary"] else " (running or stopped)") + ".",
        "",
        "## Recipe",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in (
        "model",
        "model_size",
        "tokenizer",
        "data",
        "eval_data",
        "max_length",
        "varlen",
        "epochs",
        "lr",
        "warmup_ratio",
        "grad_accum",
        "micro_batch_size",
        "sp",
        "moe_implementation",
        "expert_in_one_shard",
        "dtype",
        "seed",
    ):
        if key in recipe:
            lines.append(f"| {key} | {_fmt(recipe[key])} |")
    lines += [f"| DeepSpeed ZeRO stage | {_fmt(zero.get('stage'))} |", "", "## Hardware", ""]
    lines.append(
        f"{_fmt(head.get('world_size'))} ranks on {_fmt(head.get('device'))}"
        f" (torch {_fmt(head.get('torch'))}, DeepSpeed {_fmt(head.get('deepspeed'))})."
    )
    final_val = f"{evals[-1]['val_loss']:.4f} at step {evals[-1]['step']}" if evals else "-"
    lines += [
        "",
        "## Throughput and loss",
        "",
        "| figure | value |",
        "|---|---|",
        f"| mean TGS (tokens / GPU / s) | {sum(tgs) / len(tgs):.1f} |",
        f"| mean step time | {sum(step_time) / max(len(step_time), 1):.3f} s |",
        f"| MFU | {100 * sum(mfu) / len(mfu):.1f}% |" if mfu else "| MFU | - (device peak unknown) |",
        f"| tokens trained | {sum(r.get('tokens', 0) for r in steps)} |",
        f"| training time | {_fmt(steps[-1].get('elapsed'))} s |",
        f"| loss first -> last | {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f} |",
        f"| validation loss | {final_val} |",
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{name}]({os.path.basename(path)})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def report(work_dir: str, out: str) -> dict[str, str]:
    """Write the PNGs and report.md into the local directory ``out``; their paths by name."""
    run = load_run(work_dir)
    os.makedirs(out, exist_ok=True)
    paths = plot(run, out)
    md = os.path.join(out, "report.md")
    with open(md, "w") as f:
        f.write(markdown(run, paths))
    return {**paths, "report": md}
