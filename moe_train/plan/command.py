"""The ``moe-train plan`` click command: parse, build the plan, print it."""

from __future__ import annotations

import json
import math

import click

from moe_train.engine.metrics import active_matmul_params
from moe_train.plan import HEADROOM_WARNING, Plan, build_plan, calibration_warnings, model_config, model_layout
from moe_train.plan.memory import ATTENTIONS, count_params
from moe_train.plan.search import SearchResult, search
from moe_train.plan.speed import DEVICES, attention_keys
from moe_train.recipes import recipe_by_name_or_file
from moe_train.recipes.options import given, recipe_options

GPUS_PER_NODE = 8
# The recipe fields the planner takes as options (type, range and help from the field).
PLAN_FIELDS = ("max_length", "varlen", "moe_implementation", "expert_in_one_shard", "deepspeed")
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
    "--ep",
    type=click.IntRange(min=1),
    default=None,
    help="Also estimate expert parallelism of this degree against ZeRO-3, and suggest a degree.",
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
    ep,
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
    r = r.replace(**given(fields, PLAN_FIELDS))
    try:
        model_layout(r, model_config(r))
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--model") from None
    except ValueError as e:
        hint = "--expert-in-one-shard" if "expert_in_one_shard" in str(e) else "--model" if model_path else "RECIPE"
        raise click.BadParameter(str(e), param_hint=hint) from None
    if attention == "eager" and r.varlen:
        raise click.UsageError("--attention eager takes a 4D mask, not cu_seqlens: add --no-varlen")
    try:
        p = build_plan(
            r,
            gpus,
            gpu_mem_gb,
            nodes=nodes,
            device=gpu,
            attention=attention,
            peak_tflops=peak_tflops,
        )
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--deepspeed") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if ep is not None:
        from moe_train.plan.expert import ep_report

        try:
            text, data = ep_report(p, ep, r.grad_accum)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--ep") from None
        click.echo(json.dumps({**p.to_dict(), "expert_parallel": data}) if as_json else report(p) + "\n" + text)
        return
    if not search:
        click.echo(json.dumps(p.to_dict()) if as_json else report(p))
        return
    found = run_search(p, r.grad_accum)
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
                }
            )
        )
    else:
        click.echo(search_report(p, found))


def run_search(p: Plan, grad_accum: int) -> SearchResult:
    return search(
        p.model, p.work, p.zero, p.ds_config, p.gpus, p.nodes, p.device, p.gpu_mem_gb, grad_accum, p.peak_tflops
    )


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
    lines = [
        f"search (estimates): {p.recipe} on {p.gpus} x {p.device.name} {p.gpu_mem_gb:g} GB, {p.nodes} node(s), "
        f"{'varlen' if p.work.varlen else 'no varlen'}, {p.work.attention} attention",
        f"space: {found.space} configurations (layout x ep x sp x max_length x checkpointing x offload); "
        f"pruned {pruned}; timed {found.timed}",
        "",
    ]
    if not found.best:
        lines.append("nothing fits: more GPUs, or a GPU with more memory")
    else:
        lines.append(
            f"  {'#':>2s}  {'configuration':78s} {'GB':>6s} {'TGS':>7s} {'MFU':>6s} {'comm s':>7s}  bottleneck"
        )
        for i, r in enumerate(found.best, 1):
            thin = "!" if r.headroom_gb < HEADROOM_WARNING * p.gpu_mem_gb else " "
            lines.append(
                f"  {i:2d}  {r.candidate.label():78s} {r.per_gpu_gb:6.1f}{thin}{_tgs(r.tgs)} {r.mfu:6.1%} "
                f"{r.comm_s:7.2f}  {r.bound}"
            )
        if any(r.candidate.ep > 1 for r in found.best):
            lines += [
                "  GB with ep > 1 includes the worst-case dispatch of a skewed batch (dropless all-to-all)",
                "  ep > 1 is not fitted on a GPU measurement: its all-to-all takes the data-sheet links, and "
                "once compute-bound its TGS is capped by the GEMM efficiency fitted on the seed's ZeRO-3 table",
            ]
    ref = reference(p)
    if ref and found.best:
        lines += [
            "",
            f"XTuner (the seed) measured on 128 x A100-80G: {ref['tgs_8k']} TGS at 8k (shard), "
            f"{ref['tgs_16k_varlen']} TGS at 16k varlen; the best here is predicted at "
            f"{found.best[0].tgs:.0f} TGS",
        ]
    if any(r.headroom_gb < HEADROOM_WARNING * p.gpu_mem_gb for r in found.best):
        lines.append(
            f"warning: configurations marked ! have under {HEADROOM_WARNING:.0%} of the GPU's memory "
            "free: fragmentation or a longer sample can run out of memory"
        )
    lines += [f"warning: {w}" for w in calibration_warnings(p.device)]
    return "\n".join(lines)


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
        f"workload: {w.tokens_per_rank} tokens per GPU per micro step (max_length {w.max_length}, sp {w.sp}), "
        f"{'varlen' if w.varlen else 'no varlen'}, {w.attention} attention, "
        f"activation checkpointing {'on' if w.activation_checkpointing else 'off'}",
        "",
        "memory per GPU (GB)",
    ]
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
        f"  FLOPs/token = 6 * N_active + 6 * layers * heads * (qk_head_dim + v_head_dim) * keys "
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
