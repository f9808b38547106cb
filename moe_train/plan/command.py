"""The ``moe-train plan`` click command: parse, build the plan, print it."""

from __future__ import annotations

import json
import math

import click

from moe_train.plan import Plan, build_plan, model_config
from moe_train.plan.memory import ATTENTIONS, active_matmul_params, count_params
from moe_train.plan.speed import ACHIEVED_FRACTION, DEVICES
from moe_train.recipes import get_recipe

GPUS_PER_NODE = 8


@click.command()
@click.argument("recipe")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="Total number of GPUs (the ZeRO world size).")
@click.option("--gpu-mem-gb", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Memory of one GPU in GB (GiB, as nvidia-smi reports), e.g. 80 for an A100-80GB.")
@click.option("--gpu", "gpu", type=click.Choice(sorted(DEVICES)), default="a100", show_default=True,
              help="GPU model: sets the peak TFLOP/s and the interconnect bandwidths of the speed estimate.")
@click.option("--nodes", type=click.IntRange(min=1), default=None,
              help="Number of nodes; must divide --gpus.  [default: --gpus / 8 rounded up]")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Tokens per packed sequence.  [default: the recipe's]")
@click.option("--varlen/--no-varlen", default=None,
              help="Attend within each packed sample (cu_seqlens) or over the whole sequence.  [default: the recipe's]")
@click.option("--moe-implementation", type=click.Choice(["shard", "origin"]), default=None,
              help="Routed experts stacked in shards, or one module per expert (HF layout).  [default: the recipe's]")
@click.option("--expert-in-one-shard", type=click.IntRange(min=1), default=None,
              help="Experts per shard; must divide the routed expert count.  [default: the recipe's]")
@click.option("--attention", type=click.Choice(ATTENTIONS), default="flash", show_default=True,
              help="flash/sdpa never build S x S tensors; eager (the HF path) keeps fp32 S x S scores per head "
                   "and a 4D mask, and needs --no-varlen.")
@click.option("--deepspeed", default=None,
              help="DeepSpeed config: a shipped name (deepspeed_zero3, ...) or a JSON path.  [default: the recipe's]")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak dense bf16 TFLOP/s of one GPU.  [default: from --gpu: A100 312, H100 989, H200 989]")
@click.option("--ep", type=click.IntRange(min=1), default=None,
              help="Also estimate expert parallelism of this degree against ZeRO-3, and suggest a degree.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the report.")
def plan(recipe, gpus, gpu_mem_gb, gpu, nodes, max_length, varlen, moe_implementation, expert_in_one_shard,
         attention, deepspeed, peak_tflops, ep, as_json) -> None:
    """Estimate per-GPU memory, fit, step time, TGS and MFU of RECIPE on --gpus GPUs (estimates, not measurements)."""
    try:
        r = get_recipe(recipe)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="RECIPE") from None
    if nodes is None:
        nodes = math.ceil(gpus / GPUS_PER_NODE)
    if gpus % nodes:
        raise click.BadParameter(f"{nodes} nodes do not divide {gpus} GPUs evenly; pass --nodes", param_hint="--nodes")
    overrides = {k: v for k, v in dict(max_length=max_length, varlen=varlen, moe_implementation=moe_implementation,
                                       expert_in_one_shard=expert_in_one_shard).items() if v is not None}
    r = r.replace(**overrides)
    try:
        model_config(r)
    except ValueError as e:
        hint = "--expert-in-one-shard" if "expert_in_one_shard" in str(e) else "RECIPE"
        raise click.BadParameter(str(e), param_hint=hint) from None
    if attention == "eager" and r.varlen:
        raise click.UsageError("--attention eager takes a 4D mask, not cu_seqlens: add --no-varlen")
    try:
        p = build_plan(r, gpus, gpu_mem_gb, nodes=nodes, device=gpu, deepspeed=deepspeed, attention=attention,
                       peak_tflops=peak_tflops)
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--deepspeed") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if ep is None:
        click.echo(json.dumps(p.to_dict()) if as_json else report(p))
        return
    from moe_train.plan.expert import ep_report

    try:
        text, data = ep_report(p, ep, r.grad_accum)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--ep") from None
    click.echo(json.dumps({**p.to_dict(), "expert_parallel": data}) if as_json else report(p) + "\n" + text)


def report(p: Plan) -> str:
    cfg, w, z, mem, s = p.model, p.work, p.zero, p.memory, p.speed
    layout = (f"{cfg.shard_size} experts per shard" if cfg.moe_implementation == "shard"
              else "one module per expert (origin)")
    offload = [n for n, on in (("optimizer", z.offload_optimizer), ("params", z.offload_param)) if on]
    lines = [
        f"plan (an estimate): {p.recipe} on {p.gpus} x {p.device.name} {p.gpu_mem_gb:g} GB, {p.nodes} node(s), "
        f"{p.deepspeed} (ZeRO-{z.stage}{', offload ' + '+'.join(offload) if offload else ''})",
        f"model: {count_params(cfg) / 1e9:.1f}B params, {active_matmul_params(cfg) / 1e9:.1f}B active per token; "
        f"{cfg.n_routed_experts} routed experts, {layout}",
        f"workload: {w.tokens_per_rank} tokens per GPU per micro step (max_length {w.max_length}, sp {w.sp}), "
        f"{'varlen' if w.varlen else 'no varlen'}, {w.attention} attention, "
        f"activation checkpointing {'on' if w.activation_checkpointing else 'off'}",
        "",
        "memory per GPU (GB)",
    ]
    phases = list(mem.phases)
    overheads = ["fragmentation", "cuda_context_nccl"]
    terms = [t for t in dict.fromkeys(t for terms in mem.phases.values() for t in terms)
             if t not in overheads and any(terms.get(t) for terms in mem.phases.values())]
    terms += [t for t in overheads if t in mem.phases[mem.peak_phase]]
    lines.append(f"  {'':28s}" + "".join(f"{ph + ('*' if ph == mem.peak_phase else ''):>9s}" for ph in phases))
    for t in terms:
        lines.append(f"  {t:28s}" + "".join(
            f"{mem.phases[ph][t] / 2**30:9.2f}" if t in mem.phases[ph] else f"{'-':>9s}" for ph in phases))
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
        f"speed (estimate; {p.peak_tflops:g} TFLOP/s peak at {ACHIEVED_FRACTION:.0%} achieved, "
        f"{p.device.network_gbps if p.nodes > 1 else p.device.nvlink_gbps:g} GB/s per GPU for collectives)",
        f"  FLOPs/token = 6 * N_active + 3 * layers * heads * (qk_head_dim + v_head_dim) * max_length "
        f"= {s.model_flops_per_token / 1e9:.1f} GFLOP (hardware {s.hardware_flops_per_token / 1e9:.1f})",
        f"  per micro step: compute {s.compute_s:.2f} s, ZeRO communication {s.comm_s:.2f} s "
        f"({s.comm_bytes / 1e9:.0f} GB in {s.collectives} collectives per GPU): {s.bound}-bound",
        f"  step ({w.tokens_per_rank} x grad_accum tokens per GPU): {s.step_s:.1f} s, "
        f"TGS {s.tgs:.1f} tokens/GPU/s, MFU {s.mfu:.1%}",
        "",
        "suggested expert_in_one_shard: " + (
            f"{p.suggested_expert_in_one_shard} (the smallest shard within 2% of the fastest that fits)"
            if p.suggested_expert_in_one_shard else "none fits with these settings"),
        "suggested sp: " + (f"{p.suggested_sp} (the smallest Ulysses degree that fits)"
                            if p.suggested_sp else "none fits with these settings"),
    ]
    return "\n".join(lines)
