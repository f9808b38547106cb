"""P1: one MoE layer, forward + backward in fp32 on CPU, every expert layout on the same weights.

The layer is DeepSeek-V2-Lite's (64 routed experts, top-6, 2 shared experts, greedy softmax
routing) with hidden and expert sizes scaled down to fit a CPU.  Compared side by side:

- ``shard``: our stacked experts (`ExpertShard`, grouped GEMM), 8 experts per shard as the
  V2-Lite recipe; ``shard-all-in-one``: the 64 experts in one shard;
- ``origin``: one MLP module per expert (DeepSeek's remote-code layout);
- ``hf-<impl>``: transformers 5 ``DeepseekV2Moe`` with each experts implementation it registers
  (``eager``, ``grouped_mm``, ``batched_mm`` ...); one that cannot run here is listed with why;
- ``dense``: plain ``torch.mm`` calls doing the layer's GEMMs with every row at once (no routing),
  the GEMM rate this machine reaches for exactly the layer's FLOPs.

FLOPs of the layer, forward + backward (3 GEMMs per weight: y, dx, dw), A = T*K assignments:
routed 3 * 2 * A * 3DF, shared 3 * 2 * T * 3D(n_shared F), router 3 * 2 * T * D E.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bench.common import Result, interleaved_medians, table
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.moe import MoE
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.moe import Router


@dataclass(frozen=True)
class LayerSize:
    hidden: int
    expert_ffn: int
    tokens: int
    experts: int = 64
    top_k: int = 6
    shared: int = 2
    expert_in_one_shard: int = 8  # the DeepSeek-V2-Lite recipe's

    @property
    def assignments(self) -> int:
        return self.tokens * self.top_k

    def gemms(self) -> list[tuple[int, int, int]]:
        """(M, K, N) of every GEMM of forward + backward, as if all rows went through one weight."""
        D, F, E, A, T = self.hidden, self.expert_ffn, self.experts, self.assignments, self.tokens
        Fs = self.shared * F

        def swiglu(rows: int, f: int) -> list[tuple[int, int, int]]:
            return [
                (rows, D, 2 * f),
                (rows, f, D),  # forward: gate+up, down
                (rows, D, f),
                (D, rows, f),  # backward of down: dx, dw
                (rows, 2 * f, D),
                (2 * f, rows, D),
            ]  # backward of gate+up: dx, dw

        return swiglu(A, F) + swiglu(T, Fs) + [(T, D, E), (T, E, D), (E, T, D)]

    @property
    def flops(self) -> int:
        return sum(2 * m * k * n for m, k, n in self.gemms())


SIZES = {
    "test": LayerSize(hidden=64, expert_ffn=32, tokens=96, experts=8, top_k=2, expert_in_one_shard=4),
    "quick": LayerSize(hidden=512, expert_ffn=352, tokens=2048),
    "full": LayerSize(hidden=1024, expert_ffn=704, tokens=4096),
}


def our_config(size: LayerSize) -> DeepseekV2Config:
    return DeepseekV2Config.from_name(
        "deepseek-v2-lite",
        hidden_size=size.hidden,
        moe_intermediate_size=size.expert_ffn,
        n_routed_experts=size.experts,
        num_experts_per_tok=size.top_k,
        n_shared_experts=size.shared,
    )


def our_layer(size: LayerSize, layout: ExpertLayout) -> MoE:
    """Our MoE block (DeepSeek V2's router) of ``size`` with its experts in ``layout``."""
    cfg = our_config(size)
    return MoE(cfg, layout, Router(cfg))


def hf_moe(size: LayerSize, experts_implementation: str) -> torch.nn.Module:
    from transformers import DeepseekV2Config as HFConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = HFConfig(
        hidden_size=size.hidden,
        moe_intermediate_size=size.expert_ffn,
        n_routed_experts=size.experts,
        num_experts_per_tok=size.top_k,
        n_shared_experts=size.shared,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        hidden_act="silu",
    )
    cfg._experts_implementation = experts_implementation
    return DeepseekV2Moe(cfg)


def hf_experts_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


@torch.no_grad()
def build_layers(size: LayerSize, seed: int = 0) -> dict[str, torch.nn.Module]:
    """shard, origin and one HF module per experts implementation, all with the same weights."""
    torch.manual_seed(seed)
    shard = our_layer(size, ExpertLayout("shard", size.expert_in_one_shard))
    for p in shard.parameters():  # larger than the init std so routing is not nearly uniform
        p.normal_(0.0, 0.05)
    origin = our_layer(size, ExpertLayout("origin"))
    F_, S = size.expert_ffn, size.expert_in_one_shard
    origin.load_state_dict({k: v for k, v in shard.state_dict().items() if not k.startswith("experts.")}, strict=False)
    for e, expert in enumerate(origin.experts):
        s, i = divmod(e, S)
        expert.gate_proj.weight.copy_(shard.experts[s].gate_up_proj[i, :F_])
        expert.up_proj.weight.copy_(shard.experts[s].gate_up_proj[i, F_:])
        expert.down_proj.weight.copy_(shard.experts[s].down_proj[i])
    gate_up = torch.cat([m.gate_up_proj for m in shard.experts])
    down = torch.cat([m.down_proj for m in shard.experts])
    all_in_one = our_layer(size, ExpertLayout("shard", size.experts))
    all_in_one.load_state_dict(
        {k: v for k, v in shard.state_dict().items() if not k.startswith("experts.")}, strict=False
    )
    all_in_one.experts[0].gate_up_proj.copy_(gate_up)
    all_in_one.experts[0].down_proj.copy_(down)
    layers: dict[str, torch.nn.Module] = {"shard": shard, "shard-all-in-one": all_in_one, "origin": origin}
    for impl in hf_experts_implementations():
        hf = hf_moe(size, impl)
        hf.gate.weight.copy_(shard.gate.weight)
        hf.experts.gate_up_proj.copy_(gate_up)
        hf.experts.down_proj.copy_(down)
        hf.shared_experts.load_state_dict(shard.shared_experts.state_dict())
        layers[f"hf-{impl}"] = hf
    return layers


def layer_output(name: str, layer: torch.nn.Module, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, balance loss or None); ours return a tuple, transformers' module the output alone."""
    if name.startswith("hf-"):
        return layer(x_BTD), None
    out, aux, _ = layer(x_BTD)
    return out, aux


def fwd_bwd(name: str, layer: torch.nn.Module, x_BTD: torch.Tensor, grad_BTD: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x_BTD.grad = None
    out, aux = layer_output(name, layer, x_BTD)
    tensors, grads = [out], [grad_BTD]
    if aux is not None:
        tensors.append(aux)
        grads.append(torch.ones_like(aux))
    torch.autograd.backward(tensors, grads)


def dense_reference(size: LayerSize):
    """A function doing the layer's GEMMs (same shapes summed over experts) as plain torch.mm."""
    operands = [(torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)) for m, k, n in size.gemms()]

    def run() -> None:
        for a, b, out in operands:
            torch.mm(a, b, out=out)

    return run


def runnable(name: str, layer: torch.nn.Module, size: LayerSize, memory_budget: int) -> str | None:
    """None if the variant can run here, else why not."""
    if name == "hf-batched_mm":
        # batched_mm copies each assignment's expert weights: A x (2F + F) x D floats, kept for backward.
        need = size.assignments * 3 * size.expert_ffn * size.hidden * 4 * 2
        if need > memory_budget:
            return f"would materialise per-token expert weights, about {need / 2**30:.0f} GiB"
    try:
        probe = torch.randn(1, 4, size.hidden)
        fwd_bwd(name, layer, probe, torch.ones_like(probe))
    except Exception as e:  # a CUDA-only kernel (deepgemm, sonicmoe) fails on CPU
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return None


def run(mode: str = "quick", repeats: int | None = None, tokens: int | None = None) -> Result:
    """The P1 comparison at the `mode` size (`tokens` overrides its token count)."""
    size = SIZES[mode] if tokens is None else dataclasses.replace(SIZES[mode], tokens=tokens)
    repeats = repeats or {"test": 1, "quick": 5, "full": 5}[mode]
    layers = build_layers(size)
    for layer in layers.values():
        layer.train()
    torch.manual_seed(1)
    x = torch.randn(1, size.tokens, size.hidden, requires_grad=True)
    g = torch.randn(1, size.tokens, size.hidden)

    budget = 8 * 2**30
    skipped = {name: why for name, layer in layers.items() if (why := runnable(name, layer, size, budget))}
    active = {name: layer for name, layer in layers.items() if name not in skipped}

    with torch.no_grad():
        ref, _ = layer_output("shard", active["shard"], x)
        diffs = {name: (layer_output(name, layer, x)[0] - ref).abs().max().item() for name, layer in active.items()}

    cases = {name: (lambda n=name, m=layer: fwd_bwd(n, m, x, g)) for name, layer in active.items()}
    cases["dense"] = dense_reference(size)
    # transformers' eager loop is ~10x slower than the rest: two timed runs of it are enough.
    measured = interleaved_medians(cases, repeats=repeats, warmup=1, max_repeats={"hf-eager": 2})
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = measured[clock]

    t_shard = times["shard"]
    hf_times = {n: t for n, t in times.items() if n.startswith("hf-")}
    best_hf = min(hf_times, key=hf_times.get)
    rows = []
    for name, t in sorted(times.items(), key=lambda kv: kv[1]):
        rows.append(
            [
                name,
                measured["wall"][name] * 1e3,
                measured["cpu"][name] * 1e3,
                size.flops / t / 1e9,
                t / t_shard,
                f"{diffs[name]:.1e}" if name in diffs else "-",
            ]
        )
    for name, why in skipped.items():
        rows.append([name, "-", "-", "-", "-", f"not run: {why}"])
    figures = {
        "p1_vs_origin": times["origin"] / t_shard,
        "p1_vs_hf": hf_times[best_hf] / t_shard,
        "p1_gemm_fraction": times["dense"] / t_shard,
        "p1_max_abs_diff": max(diffs.values()),
    }
    notes = (
        f"{size}; {size.flops / 1e9:.1f} GFLOP per forward+backward; median of {repeats} interleaved runs "
        f"(hf-eager: {min(2, repeats)}); GFLOP/s, time / shard and the figures from {clock} time "
        f"({torch.get_num_threads()} thread(s)); "
        f"best transformers variant: {best_hf}."
    )
    targets = {
        "p1_vs_origin": (">=", 4),
        "p1_vs_hf": (">=", 1.2),
        "p1_gemm_fraction": (">=", 0.7),
        "p1_max_abs_diff": ("<=", 1e-4),
    }
    headers = ["variant", "wall ms", "cpu ms", "GFLOP/s", "time / shard", "max abs diff vs shard"]
    return Result("P1 MoE layer forward+backward, fp32 CPU", figures, table(headers, rows), notes, targets)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="P1 alone, optionally over several token counts")
    parser.add_argument("--mode", choices=list(SIZES), default="quick", help="layer widths (and default tokens)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts to sweep, e.g. 128,512,2048")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for t in [int(v) for v in args.tokens.split(",")] if args.tokens else [None]:
        print(run(args.mode, tokens=t), flush=True)
