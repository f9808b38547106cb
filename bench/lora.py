"""LoRA on routed experts: one expert shard, forward + backward in fp32 on CPU, one thread.

Compared on the same shard weights, rows and adapters (rank R):

- ``full``: the base shard trained in full (weight gradients of the (S, 2F, D) and (S, D, F) stacks);
- ``lora``: ours, ``LoraExpertShard``: base frozen, the update as two rank-R grouped GEMMs per projection;
- ``delta``: what PEFT's ``target_parameters`` does: W + scaling * B A built as an (S, out, in) tensor every
  forward, then the grouped GEMM on it (base frozen, the adapters get their gradients through the delta).

Reported: median CPU time per forward + backward, and the bytes autograd saves for backward (the
activation memory a layer costs), from ``saved_tensors_hooks``.  ``python -m bench.lora [--quick]``.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import interleaved_medians, machine, table
from moe_train.models.common.experts import ExpertShard, _GroupedLinear, _SwiGLU
from moe_train.models.common.lora import LoraConfig, LoraExpertShard


def _delta_forward(shard: LoraExpertShard, x_AD: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    """The materialised-delta reference: the full (S, O, I) weight W + s * B A, then one grouped GEMM."""
    s = shard.scaling
    gate_up = shard.gate_up_proj + torch.bmm(shard.gate_up_lora_B, shard.gate_up_lora_A) * s
    down = shard.down_proj + torch.bmm(shard.down_lora_B, shard.down_lora_A) * s
    h = _SwiGLU.apply(_GroupedLinear.apply(x_AD, gate_up, counts_S))
    return _GroupedLinear.apply(h, down, counts_S)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded (they exist anyway)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(storages.values())


def run(quick: bool) -> str:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # rows per expert as in DeepSeek V2 training (8k tokens x top-6 / 160 experts ~ 300), V2-Lite's D and F
    S, D, F_, R = (8, 512, 256, 8) if quick else (8, 2048, 1408, 16)
    rows = S * 256
    base = ExpertShard(S, D, F_, std=0.02)
    lora = LoraExpertShard(base, S, D, F_, LoraConfig(R, 2.0 * R))
    with torch.no_grad():
        lora.gate_up_lora_B.normal_(0, 0.02)
        lora.down_lora_B.normal_(0, 0.02)
    x = torch.randn(rows, D, requires_grad=True)  # input gradients flow, as inside a model
    counts = torch.full((S,), rows // S)
    weight = torch.randn(rows, D)  # a fixed upstream gradient

    def step(forward, trainable_base: bool):
        def call():
            for p in (base.gate_up_proj, base.down_proj):
                p.requires_grad_(trainable_base)
                p.grad = None
            for p in [x, *lora.parameters()]:
                p.grad = None
            (forward() * weight).sum().backward()

        return call

    cases = {
        "full": step(lambda: base(x, counts), True),
        "lora": step(lambda: lora(x, counts), False),
        "delta": step(lambda: _delta_forward(lora, x, counts), False),
    }
    times = interleaved_medians(cases, repeats=3 if quick else 5)["cpu"]
    saved = {"full": _saved_bytes(lambda: base(x, counts))}
    for p in (base.gate_up_proj, base.down_proj):
        p.requires_grad_(False)
    saved |= {
        "lora": _saved_bytes(lambda: lora(x, counts)),
        "delta": _saved_bytes(lambda: _delta_forward(lora, x, counts)),
    }
    with torch.no_grad():
        diff = (lora(x, counts) - _delta_forward(lora, x, counts)).abs().max().item()
    rows_out = [
        [name, f"{times[name] * 1e3:.1f}", f"{times[name] / times['full']:.2f}", f"{b / 2**20:.1f}"]
        for name, b in saved.items()
    ]
    head = f"S={S} D={D} F={F_} R={R}, {rows} rows; {machine()}; lora vs delta max abs diff {diff:.1e}"
    return head + "\n\n" + table(["variant", "fwd+bwd CPU ms", "vs full", "saved for backward MiB"], rows_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    print(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
