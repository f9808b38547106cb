"""The ``moe-train plan`` click command: parse, build the plan, print it."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from moe_train.engine.metrics import active_matmul_params
from moe_train.plan import HEADROOM_WARNING, Plan, build_plan, calibration_warnings, model_config, model_layout
from moe_train.plan.booking import (
    TIME_MARGIN,
    Booking,
    commands,
    data_tokens,
    duration,
    planned_for,
    slurm_time,
)
from moe_train.plan.lora import adapters
from moe_train.plan.memory import ATTENTIONS, count_params
from moe_train.plan.search import Candidate, SearchResult, search
from moe_train.plan.speed import DEVICES, attention_keys
from moe_train.recipes import RECIPES, Recipe, recipe_by_name_or_file
from moe_train.recipes.builtin import PLANNED
from moe_train.recipes.options import given, recipe_options

GPUS_PER_NODE = 8
# The shipped DeepSpeed config of each offload the search tries ("optimizer" alone has none shipped).
OFFLOAD_CONFIGS = {"optimizer+params": "deepspeed_zero3_offload"}
# The recipe fields the planner takes as options (type, range and help from the field).
PLAN_FIELDS = (
    "max_length",
    "varlen",
    "moe_implementation",
    "expert_in_one_shard",
    "deepspeed",
    "lora_rank",
    "lora_targets",
    "hold_experts",
)
# XTuner's published figures for DeepSeek-V2 236B on 128 A100-80G (the seed), for --search to compare against.
SEED_REFERENCE = {"model_shape": (5120, 60, 160), "gpus": 128, "tgs_8k": 120, "tgs_16k_varlen": 180}


@click.command()
@click.argument("recipe")
@recipe_options(PLAN_FIELDS)
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="Total number of GPUs (the ZeRO world size).")
@click.option(
    "--gpu-mem-gb",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Memory of one GPU in GB (GiB, as nvidia-smi reports), e.g. 80 for an A100-80GB.",
)
@click.option(
    "--gpu",
    "gpu",
    type=click.Choice(sorted(DEVICES)),
    default="a100",
    show_default=True,
    help="GPU model: sets the peak TFLOP/s and the interconnect bandwidths of the speed estimate.",
)
@click.option(
    "--nodes",
    type=click.IntRange(min=1),
    default=None,
    help="Number of nodes; must divide --gpus.  [default: --gpus / 8 rounded up]",
)
@click.option(
    "--attention",
    type=click.Choice(ATTENTIONS),
    default="flash",
    show_default=True,
    help="flash/sdpa never build S x S tensors; eager (the HF path) keeps fp32 S x S scores per head "
    "and a 4D mask, and needs --no-varlen.",
)
@click.option(
    "--peak-tflops",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Peak dense bf16 TFLOP/s of one GPU.  [default: from --gpu: A100 312, H100 989, H200 989]",
)
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="PATH|URL",
    help="Plan this model (any registered family) instead of the recipe's: a config.json or an HF checkpoint "
    "directory, local or an fsspec URL (s3://...).",
)
@click.option(
    "--search",
    is_flag=True,
    help="Sweep expert layout, EP degree, SP degree, max_length, activation checkpointing and offload; print the "
    "fastest configurations that fit and what was pruned.",
)
@click.option(
    "--free-batch",
    is_flag=True,
    help="Let --search change the global batch (tokens per optimizer step): a longer pack at the recipe's "
    "grad_accum is then a different training run, ranked with the others.",
)
@click.option(
    "--headroom",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=HEADROOM_WARNING,
    show_default=True,
    help="Share of the GPU's memory a configuration must leave free to be ranked first by --search (and "
    "not warned about).",
)
@click.option(
    "--ep",
    type=click.IntRange(min=1),
    default=None,
    help="Also estimate expert parallelism of this degree against ZeRO-3, and suggest a degree.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens in one epoch of the data, for the booking figures.  [default: an estimate for the alpaca "
    "recipes, else none]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the report.")
def plan(
    recipe,
    gpus,
    gpu_mem_gb,
    gpu,
    nodes,
    attention,
    peak_tflops,
    model_path,
    search,
    free_batch,
    headroom,
    ep,
    tokens,
    as_json,
    **fields,
) -> None:
    """Estimate per-GPU memory, fit, step time, TGS and MFU of RECIPE (a built-in or a recipe file) on --gpus
    GPUs (estimates, not measurements)."""
    try:
        r = recipe_by_name_or_file(recipe)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="RECIPE") from None
    if model_path:
        r = r.replace(model=model_path, model_size=None)
    if nodes is None:
        nodes = math.ceil(gpus / GPUS_PER_NODE)
    if gpus % nodes:
        raise click.BadParameter(f"{nodes} nodes do not divide {gpus} GPUs evenly; pass --nodes", param_hint="--nodes")
    changes = given(fields, PLAN_FIELDS)
    r = r.replace(**changes)
    try:
        model_layout(r, model_config(r))
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--model") from None
    except ValueError as e:
        hint = "--expert-in-one-shard" if "expert_in_one_shard" in str(e) else "--model" if model_path else "RECIPE"
        raise click.BadParameter(str(e), param_hint=hint) from None
    if attention == "eager" and r.varlen:
        raise click.UsageError("--attention eager takes a 4D mask, not cu_seqlens: add --no-varlen")
    # ``--ep N --hold-experts`` holds in the EP section; the plan above it keeps the recipe's ep, where
    # holding is refused at ep 1 (the trainer's own check says so when --hold-experts comes without --ep).
    hold = r.hold_experts
    if ep is not None and r.ep == 1:
        r = r.replace(hold_experts=False)
    try:
        p = build_plan(
            r,
            gpus,
            gpu_mem_gb,
            nodes=nodes,
            device=gpu,
            attention=attention,
            peak_tflops=peak_tflops,
            headroom=headroom,
        )
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--deepspeed") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if ep is not None:
        from moe_train.plan.expert import ep_report

        try:
            text, data = ep_report(p, ep, r.grad_accum, hold)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--ep") from None
        click.echo(json.dumps({**p.to_dict(), "expert_parallel": data}) if as_json else report(p) + "\n" + text)
        return
    if not search:
        text, data = booking_report(r, p, changes, tokens)
        click.echo(json.dumps({**p.to_dict(), **data}) if as_json else report(p) + "\n" + text)
        return
    found = run_search(p, r.grad_accum, free_batch)
    text, data = booking_report(r, p, changes, tokens, found)
    if as_json:
        click.echo(
            json.dumps(
                {
                    **found.to_dict(),
                    "recipe": p.recipe,
                    "gpus": p.gpus,
                    "gpu": p.device.name,
                    "gpu_mem_gb": p.gpu_mem_gb,
                    "reference": reference(p),
                    "warnings": calibration_warnings(p.device),
                    **data,
                }
            )
        )
    else:
        click.echo(search_report(p, found) + "\n" + text)


def _candidate_changes(r: Recipe, c: Candidate) -> dict[str, Any]:
    """The recipe fields a search candidate changes (its offload as the DeepSpeed config that has it)."""
    fields = {
        "moe_implementation": c.moe_implementation,
        "expert_in_one_shard": c.expert_in_one_shard,
        "ep": c.ep,
        "sp": c.sp,
        "max_length": c.max_length,
        "grad_accum": c.grad_accum,
        "activation_checkpointing": c.activation_checkpointing,
        "hold_experts": c.hold_experts,
    }
    out = {k: v for k, v in fields.items() if v is not None and getattr(r, k) != v}
    if c.offload != "none":
        out["deepspeed"] = OFFLOAD_CONFIGS.get(c.offload, f"<a ZeRO-3 config offloading the {c.offload}>")
    return out


def _no_fit(r: Recipe, p: Plan) -> list[tuple[str, float, dict[str, Any] | int]]:
    """The smallest changes that make ``r`` fit: more GPUs (the first doubling that fits), and on these GPUs,
    of each kind of change (expert parallel, an offload config, shorter packs), the configuration that
    changes the fewest recipe fields, the fastest of those."""
    out: list[tuple[str, float, dict[str, Any] | int]] = []
    for gpus in (2 * p.gpus, 4 * p.gpus, 8 * p.gpus):
        try:
            more = build_plan(
                r,
                gpus,
                p.gpu_mem_gb,
                nodes=max(1, gpus // GPUS_PER_NODE),
                device=_device_key(p),
                attention=p.work.attention,
                peak_tflops=p.peak_tflops,
            )
        except ValueError:
            continue
        if more.fits:
            out.append((f"{gpus} GPUs", more.speed.tgs, gpus))
            break
    found = search(
        p.model,
        p.work,
        p.zero,
        p.ds_config,
        p.gpus,
        p.nodes,
        p.device,
        p.gpu_mem_gb,
        r.grad_accum,
        p.peak_tflops,
        top=10**6,
        headroom=p.headroom,
    )
    kinds = {
        "expert parallel": lambda c: c.ep > 1,
        "an offload config": lambda c: c.offload != "none",
        "shorter packs": lambda c: c.max_length < r.max_length,
    }
    for kind, match in kinds.items():  # of each kind, the one that changes fewest fields, then the fastest
        options = [(_candidate_changes(r, x.candidate), x) for x in found.best if match(x.candidate)]
        if options:
            change, best = min(options, key=lambda o: (len(o[0]), o[1].tight, -o[1].tgs))
            out.append((kind, best.tgs, change))
    return out


def _device_key(p: Plan) -> str:
    return next(k for k, d in DEVICES.items() if d.name == p.device.name)


def booking_report(
    r: Recipe, p: Plan, changes: dict[str, Any], tokens: int | None, found: SearchResult | None = None
) -> tuple[str, dict[str, Any]]:
    """The booking section (text, JSON): time, GPU-hours and the commands for the plan, or for the search's
    #1; on a no-fit the smallest changes that fit; for a seed recipe, its planned recipes."""
    lines, data = ["", "booking (estimates)"], {}
    n, source = data_tokens(r, tokens)
    if found is not None and found.best:
        top = found.best[0]
        tgs, fits = top.tgs, True
        changes = {**changes, **_candidate_changes(r, top.candidate)}
        what = "search #1"
    else:
        tgs, fits, what = p.speed.tgs, p.fits, "this plan"
    if not fits:
        lines.append(f"  {r.name} does not fit here; the smallest changes that fit, each with its predicted TGS:")
        options = _no_fit(r, p)
        for kind, speed, change in options:
            detail = f"--gpus {change}" if isinstance(change, int) else ", ".join(f"{k} {v}" for k, v in change.items())
            lines.append(f"    {kind}: {detail} (TGS {speed:.1f})")
        if not options:
            lines.append("    nothing on up to 8x the GPUs: a GPU with more memory")
        data["if_it_does_not_fit"] = [
            {"change": kind, "tgs": round(speed, 1), "with": change} for kind, speed, change in options
        ]
    else:
        batch = found.global_batch if found is not None and found.global_batch else None
        batch = batch or p.gpus * p.work.tokens_per_rank * changes.get("grad_accum", r.grad_accum)
        run_s = None
        if n:
            b = Booking(n, r.epochs, batch, tgs, p.gpus)
            run_s = b.run_s
            lines += [
                f"  data: {n / 1e6:.2f}M tokens per epoch ({source})",
                f"  {what}: {b.steps_per_epoch} optimizer steps of {batch} tokens per epoch; {duration(b.epoch_s)} "
                f"per epoch, {duration(b.run_s)} for {r.epochs} epoch(s) at TGS {tgs:.1f} on {p.gpus} GPUs: "
                f"{b.gpu_hours:.1f} GPU-hours; Slurm time limit {slurm_time(b.run_s)} (x{TIME_MARGIN:g} + 1 h)",
            ]
            data["booking"] = b.to_dict()
        else:
            lines.append(f"  data: {source}")
        cmds = commands(r.name, p.gpus, changes, run_s)
        lines += [f"  torchx: {cmds['torchx']}", f"  srun:   {cmds['srun']}"]
        data["commands"] = cmds
    planned = []
    for name in planned_for(r.name):
        cluster = PLANNED[name]
        there = build_plan(
            RECIPES[name], cluster.gpus, cluster.gpu_mem_gb, nodes=cluster.gpus // GPUS_PER_NODE, device=cluster.gpu
        )
        here = build_plan(
            RECIPES[cluster.based_on],
            cluster.gpus,
            cluster.gpu_mem_gb,
            nodes=cluster.gpus // GPUS_PER_NODE,
            device=cluster.gpu,
        )
        speedup = there.speed.tgs / here.speed.tgs
        lines.append(
            f"planned: {name} runs this training run on {cluster.gpus} x {there.device.name} "
            f"{cluster.gpu_mem_gb:g} GB at TGS {there.speed.tgs:.1f}, {speedup:.1f}x this recipe's "
            f"{here.speed.tgs:.1f} there (TorchX preset {cluster.preset})"
        )
        planned.append({"recipe": name, "gpus": cluster.gpus, "tgs": round(there.speed.tgs, 1), "speedup": speedup})
    data["planned"] = planned
    return "\n".join(lines), data


def run_search(p: Plan, grad_accum: int, free_batch: bool = False) -> SearchResult:
    args = (p.model, p.work, p.zero, p.ds_config, p.gpus, p.nodes, p.device, p.gpu_mem_gb, grad_accum)
    return search(*args, p.peak_tflops, headroom=p.headroom, free_batch=free_batch)


def reference(p: Plan) -> dict | None:
    """XTuner's published TGS, when the plan is of the model and GPU they measured."""
    ref = SEED_REFERENCE
    same = (p.model.hidden_size, p.model.num_hidden_layers, p.model.num_experts) == ref["model_shape"]
    return {k: v for k, v in ref.items() if k != "model_shape"} if same and p.device.name == "A100" else None


def _tgs(tgs: float) -> str:
    """Seven columns whatever the size (a tiny model reaches millions)."""
    return f"{tgs:7.1f}" if tgs < 1e5 else f"{tgs:7.1e}"


def search_report(p: Plan, found: SearchResult) -> str:
    pruned = ", ".join(f"{n} {why}" for why, n in found.pruned.items())
    room = found.headroom * p.gpu_mem_gb
    lines = [
        f"search (estimates): {p.recipe} on {p.gpus} x {p.device.name} {p.gpu_mem_gb:g} GB, {p.nodes} node(s), "
        f"{'varlen' if p.work.varlen else 'no varlen'}, {p.work.attention} attention",
        f"space: {found.space} configurations (layout x ep x sp x max_length x checkpointing x offload); "
        f"pruned {pruned}; timed {found.timed}",
        (
            f"held: {found.global_batch} tokens per optimizer step (grad_accum chosen per max_length and sp) and "
            f"the recipe's numerics; --free-batch lets the batch change"
            if found.global_batch
            else "--free-batch: max_length and sp change the global batch at the recipe's grad_accum"
        ),
        "",
    ]
    if not found.best:
        lines.append("nothing fits at this batch: more GPUs, or a GPU with more memory")
    else:
        lines.append(
            f"  {'#':>2s}  {'configuration':94s} {'GB':>6s} {'TGS':>7s} {'MFU':>6s} {'comm s':>7s}  bottleneck"
        )
        lines += _rows(found.best)
        if any(r.candidate.hold_experts for r in found.best):
            lines.append(
                "  ep N hold: --hold-experts, the local experts gathered once per optimizer step and kept to it "
                "(in GB); tried wherever ep > 1 leaves more than one rank per expert-data-parallel group"
            )
        if any(r.candidate.ep > 1 for r in found.best):
            lines += [
                "  GB with ep > 1 includes the worst-case dispatch of a skewed batch (dropless all-to-all)",
                "  ep > 1 is not fitted on a GPU measurement: its all-to-all takes the data-sheet links, and "
                "once compute-bound its TGS is capped by the GEMM efficiency fitted on the seed's ZeRO-3 table",
            ]
        first = found.best[0]
        lines.append(
            f"verdict: #1 leaves {first.headroom_gb:.1f} GB free, at least the {found.headroom:.0%} headroom "
            f"({room:.1f} GB)"
            if not first.tight
            else f"verdict: nothing leaves the {found.headroom:.0%} headroom ({room:.1f} GB); #1 is the fastest that "
            f"fits at all, with {first.headroom_gb:.1f} GB free: fragmentation or a longer sample can run out of "
            "memory; more GPUs or an offload config leave room"
        )
    if found.other_batch:
        lines += ["", "change the global batch (a different training run; not ranked, --free-batch ranks them):"]
        lines += _rows(found.other_batch[:3])
    ref = reference(p)
    if ref and found.best:
        lines += [
            "",
            f"XTuner (the seed) measured on 128 x A100-80G: {ref['tgs_8k']} TGS at 8k (shard), "
            f"{ref['tgs_16k_varlen']} TGS at 16k varlen; the best here is predicted at "
            f"{found.best[0].tgs:.0f} TGS",
        ]
    if any(r.tight for r in found.best):
        lines.append(
            f"warning: configurations marked ! have under {found.headroom:.0%} of the GPU's memory "
            "free and rank after every one that has it"
        )
    lines += [f"warning: {w}" for w in calibration_warnings(p.device)]
    return "\n".join(lines)


def _rows(ranked: list) -> list[str]:
    return [
        f"  {i:2d}  {r.candidate.label():94s} {r.per_gpu_gb:6.1f}{'!' if r.tight else ' '}{_tgs(r.tgs)} "
        f"{r.mfu:6.1%} {r.comm_s:7.2f}  {r.bound}"
        for i, r in enumerate(ranked, 1)
    ]


def report(p: Plan) -> str:
    cfg, w, z, mem, s = p.model, p.work, p.zero, p.memory, p.speed
    cal = p.device.calibration
    layout = (
        f"{p.layout.shard_size(cfg.num_experts)} experts per shard"
        if p.layout.moe_implementation == "shard"
        else "one module per expert (origin)"
    )
    offload = [n for n, on in (("optimizer", z.offload_optimizer), ("params", z.offload_param)) if on]
    lines = [
        f"plan (an estimate): {p.recipe} on {p.gpus} x {p.device.name} {p.gpu_mem_gb:g} GB, {p.nodes} node(s), "
        f"{p.deepspeed} (ZeRO-{z.stage}{', offload ' + '+'.join(offload) if offload else ''})",
        f"model: {count_params(cfg) / 1e9:.1f}B params, {active_matmul_params(cfg) / 1e9:.1f}B active per token; "
        f"{cfg.num_experts} routed experts, {layout}",
        f"workload: {w.tokens_per_rank} tokens per GPU per micro step (max_length {w.max_length}, sp {w.sp}"
        + (f", ep {p.ep}" + (" holding its experts (--hold-experts)" if p.hold_experts else "") if p.ep > 1 else "")
        + "), "
        f"{'varlen' if w.varlen else 'no varlen'}, {w.attention} attention, "
        f"activation checkpointing {'on' if w.activation_checkpointing else 'off'}",
    ]
    if w.lora is not None:
        lines.append(
            f"lora: rank {w.lora.rank} on {', '.join(w.lora.targets)}: "
            f"{adapters(cfg, p.layout, w.lora).numel / 1e6:.1f}M adapter params trained, the base frozen (its "
            "weights only: no gradient, fp32 master or Adam state)"
        )
    lines += ["", "memory per GPU (GB)"]
    phases = list(mem.phases)
    overheads = ["fragmentation", "cuda_context_nccl"]
    terms = [
        t
        for t in dict.fromkeys(t for terms in mem.phases.values() for t in terms)
        if t not in overheads and any(terms.get(t) for terms in mem.phases.values())
    ]
    terms += [t for t in overheads if t in mem.phases[mem.peak_phase]]
    lines.append(f"  {'':28s}" + "".join(f"{ph + ('*' if ph == mem.peak_phase else ''):>9s}" for ph in phases))
    for t in terms:
        lines.append(
            f"  {t:28s}"
            + "".join(f"{mem.phases[ph][t] / 2**30:9.2f}" if t in mem.phases[ph] else f"{'-':>9s}" for ph in phases)
        )
    lines.append(f"  {'total':28s}" + "".join(f"{mem.totals[ph] / 2**30:9.2f}" for ph in phases))
    lines.append("  phases: loss = end of forward with logits; layer = backward of one MoE layer; step = optimizer")
    if mem.cpu_bytes:
        lines.append(f"  host memory for offloaded states: {mem.cpu_bytes / 2**30:.1f} GB per GPU")
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines += [
        "",
        f"verdict: {verdict}: peak {mem.per_gpu_gb:.1f} GB ({mem.peak_phase} phase) of {p.gpu_mem_gb:g} GB, "
        f"headroom {p.headroom_gb:+.1f} GB",
        "",
        f"speed (estimate; {p.peak_tflops:g} TFLOP/s peak, GEMMs at {cal.gemm_efficiency:.0%} and flash attention "
        f"at {cal.flash_efficiency:.0%} of it, {p.device.network_gbps if p.nodes > 1 else p.device.nvlink_gbps:g} "
        f"GB/s per GPU for collectives; {cal.source})",
        f"  FLOPs/token = {'4 * N_active + 6 * adapters_active' if w.lora else '6 * N_active'} "
        "+ 6 * layers * heads * (qk_head_dim + v_head_dim) * keys "
        f"= {s.model_flops_per_token / 1e9:.1f} GFLOP (hardware {s.hardware_flops_per_token / 1e9:.1f}; "
        f"keys {attention_keys(w):.0f} per token{' within each sample' if w.varlen else ''})",
        f"  per micro step: compute {s.compute_s:.2f} s, ZeRO-3 hooks {s.hooks_s:.2f} s, communication "
        f"{s.comm_s:.2f} s of which {s.exposed_comm_s:.2f} s not hidden behind compute "
        f"({s.comm_bytes / 1e9:.0f} GB in {s.collectives} collectives per GPU): {s.bound}-bound",
        f"  step ({w.tokens_per_rank} x grad_accum tokens per GPU): {s.step_s:.1f} s, "
        f"TGS {s.tgs:.1f} tokens/GPU/s, MFU {s.mfu:.1%}",
        "",
        "suggested expert_in_one_shard: "
        + (
            f"{p.suggested_expert_in_one_shard} (the smallest shard within 2% of the fastest that fits)"
            if p.suggested_expert_in_one_shard
            else "none fits with these settings"
        ),
        "suggested sp: "
        + (
            f"{p.suggested_sp} (the smallest Ulysses degree that fits)"
            if p.suggested_sp
            else "none fits with these settings"
        ),
    ]
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)
