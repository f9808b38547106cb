"""``moe-train report WORK_DIR``: PNG plots and a one-page report.md of a run, local or on an object store.

Only reads the work dir (metrics segments, recipe.json, deepspeed.json, summary.json, the lease's age), so
it works on a live run and never takes the run's lease.  The run's state (``run_state``: running, finished,
stopped at step N of M and why, diverged) heads report.md; every curve marks the steps a later segment
resumed from.  Figures:

* ``loss.png``         training loss per step and validation loss
* ``lr.png``           learning rate
* ``grad_norm.png``    gradient norm before clipping (log scale)
* ``throughput.png``   tokens per GPU per second, and MFU when the device's peak is known
* ``expert_load.png``  one row per MoE layer, one column per step: the busiest expert's tokens over the
                       mean tokens per expert (1 = balanced; a collapsed router approaches experts / top_k)
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from moe_train.engine.lease import STALE_S
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
    heads = [i for i, r in enumerate(records) if r.get("event") == "segment"]
    last_segment = records[heads[-1] if heads else 0 :]
    segments = [r for r in records if r.get("event") == "segment"]
    out = {
        "work_dir": run.where,
        "steps": steps,
        "evals": [r for r in records if r.get("event") == "eval"],
        "segments": segments,
        "ends": [r for r in last_segment if r.get("event") in ("stopped", "diverged")],
        "recipe": run.read_json(run.recipe) or {},
        "deepspeed": run.read_json(run.deepspeed) or {},
        "summary": current_summary(run, segments),
        "lease_age_s": lease_age(run),
    }
    out["state"] = run_state(out)
    return out


def lease_age(run: RunDir) -> float | None:
    """Seconds since the work dir's lease was last renewed (by this machine's clock); None without a lease
    or when the newest one is released.  Read only: the report never takes or touches the lease."""
    fs = run.fs
    fs.invalidate_cache(run.lease)
    if not fs.exists(run.lease):
        return None
    leases = sorted(p for p in fs.ls(run.lease, detail=False) if p.endswith(".json"))
    if not leases:
        return None
    try:
        if json.loads(fs.cat_file(leases[-1])).get("released"):
            return None  # a tombstone: the last holder released the work dir when it ended
    except (ValueError, AttributeError, OSError):
        pass  # being rewritten, or not a record: its age still says whether someone renews it
    return time.time() - fs.modified(leases[-1]).timestamp()


_SIGNALS = {"SIGTERM": "preempted or cancelled", "SIGUSR1": "preempted", "SIGINT": "interrupted"}


def run_state(run: dict[str, Any]) -> dict[str, Any]:
    """The run's state from its records, the first that holds:

    * running: the lease was renewed within ``STALE_S`` (a live owner heartbeats every 15 s);
    * diverged: the last segment ends with a ``diverged`` record (the trainer's divergence guard);
    * stopped (signal): the last segment ends with a ``stopped`` record: the signal, and who sends it;
    * finished: summary.json exists and the last step is the schedule's last (``planned_steps``);
    * stopped (max_steps): summary.json exists short of the schedule's last step;
    * stopped (no record): no summary and no end record: killed (SIGKILL, OOM, node loss) or failed.
    """
    last = run["steps"][-1]["step"]
    head = run["segments"][-1] if run["segments"] else {}
    planned = head.get("planned_steps")
    state = {"step": last, "of": planned}
    end = run["ends"][-1] if run["ends"] else None
    age = run["lease_age_s"]
    if age is not None and age < STALE_S:
        return {**state, "state": "running", "why": f"lease renewed {max(age, 0):.0f} s ago"}
    if end and end["event"] == "diverged":
        return {**state, "state": "diverged", "step": end["step"], "why": end.get("reason", "")}
    if end and end["event"] == "stopped":
        signal = end.get("signal", "a signal")
        return {**state, "state": "stopped", "why": f"{_SIGNALS.get(signal, 'signal')} ({signal})"}
    if run["summary"] is not None:
        if planned is None or last >= planned:
            return {**state, "state": "finished", "why": "reached the last planned step"}
        return {**state, "state": "stopped", "why": f"max_steps {head.get('total_steps', last)} (lowered)"}
    return {
        **state,
        "state": "stopped",
        "why": "no summary and no stop record: killed (SIGKILL, out of memory, node lost) or failed; see its log",
    }


def state_line(state: dict[str, Any]) -> str:
    of = f" of {state['of']}" if state["of"] else ""
    if state["state"] == "finished":
        return f"finished at step {state['step']}{of} ({state['why']})"
    if state["state"] == "running":
        return f"running, last step {state['step']}{of} ({state['why']})"
    if state["state"] == "diverged":
        return f"diverged at step {state['step']}{of}: {state['why']}"
    return f"stopped at step {state['step']}{of}: {state['why']}"


def resume_points(run: dict[str, Any]) -> list[int]:
    """The steps later segments resumed from (a checkpoint's step)."""
    return [h["resumed_from"] for h in run["segments"] if h.get("resumed_from")]


def _mark_resumes(ax, steps: list[int]) -> None:
    for i, s in enumerate(steps):
        ax.axvline(s, ls="--", lw=0.9, color="gray", label="resumed" if i == 0 else None)


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
    resumes = resume_points(run)
    paths = {}

    fig, ax = _figure("Loss (token-weighted cross entropy)", "loss (nats per token)")
    ax.plot(x, [r["loss"] for r in steps], lw=1.2, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=4, label="validation")
    _mark_resumes(ax, resumes)
    ax.legend()
    paths["loss"] = _save(fig, os.path.join(out, "loss.png"))

    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(x, [r["lr"] for r in steps], lw=1.2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _mark_resumes(ax, resumes)
    paths["lr"] = _save(fig, os.path.join(out, "lr.png"))

    fig, ax = _figure("Gradient norm (before clipping)", "global L2 norm")
    norms = [(r["step"], r["grad_norm"]) for r in steps if r.get("grad_norm")]
    if norms:
        from matplotlib.ticker import FuncFormatter

        ax.plot([n[0] for n in norms], [n[1] for n in norms], lw=1.2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    _mark_resumes(ax, resumes)
    paths["grad_norm"] = _save(fig, os.path.join(out, "grad_norm.png"))

    fig, ax = _figure("Throughput", "tokens per GPU per second (TGS)")
    ax.plot(x, [r["tgs"] for r in steps], lw=1.2, color="tab:blue", label="TGS")
    mfu = [(r["step"], 100 * r["mfu"]) for r in steps if r.get("mfu")]
    if mfu:
        right = ax.twinx()
        right.plot([m[0] for m in mfu], [m[1] for m in mfu], lw=1.0, color="tab:orange", label="MFU")
        right.set_ylabel("MFU (% of dense bf16 peak)")
    ax.set_ylim(bottom=0)
    _mark_resumes(ax, resumes)  # a resume restarts the data loader and warms up again: a dip, explained
    if resumes:
        ax.legend(loc="lower right")
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
        for r in resumes:
            ax.axvline(r + 0.5, ls="--", lw=0.9, color="white")
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
        f"Work dir `{run['work_dir']}`: {len(steps)} steps in {len(heads)} segment(s); "
        f"{state_line(run['state'])}."
        + (
            f" Resumed from step {', '.join(map(str, resume_points(run)))} (dashed on the curves)."
            if resume_points(run)
            else ""
        ),
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
