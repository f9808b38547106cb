"""2-rank ZeRO-3 training where rank 1 routes every token to experts 0 and 1 only.

Run under torchrun: `python -m tests.skew_worker LAYOUT` with LAYOUT one of
  shard        the product layout (shards of 2 experts: shards 1-3 get nothing from rank 1)
  origin       one module per expert, every expert called (the product's origin)
  origin-skip  one module per expert, idle experts skipped (HF/remote-code style): must fail
Prints "completed" after 3 optimiser steps.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch

from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config
from moe_train.engine.distributed import destroy_distributed, hard_exit, init_distributed
from moe_train.engine.model import build_model
from moe_train.models.common.experts import ExpertLayout, PerExpertModules
from moe_train.models.deepseek_v2 import DeepseekV2Config
from moe_train.models.deepseek_v2.moe import Router
from moe_train.parallel.dims import ParallelDims


def force_routing_on_rank(rank: int) -> None:
    original = Router.forward

    def forward(self, x_TD):
        scores, weight, index = original(self, x_TD)
        if rank == 1:  # only experts 0 and 1: whole shards and most experts see no token here
            index = torch.arange(index.shape[1]).remainder(2).expand_as(index).contiguous()
        return scores, weight, index

    Router.forward = forward


def skip_idle_experts() -> None:
    def forward(self, x_AD, counts_E):
        outs = [expert(x) for expert, x, n in zip(self, x_AD.split(counts_E.tolist()), counts_E.tolist()) if n]
        return torch.cat(outs)

    PerExpertModules.forward = forward


def main() -> None:
    layout = sys.argv[1]
    info = init_distributed("pytorch", timeout=timedelta(seconds=30))
    force_routing_on_rank(info.rank)
    if layout == "origin-skip":
        skip_idle_experts()
    import deepspeed

    cfg = DeepseekV2Config.from_name("tiny", topk_method="greedy")
    experts = ExpertLayout("shard", 2) if layout == "shard" else ExpertLayout("origin")
    ds = fill_auto(
        load_deepspeed_config("deepspeed_zero3"),
        micro_batch_size=1,
        grad_accum=1,
        world_size=info.world_size,
        grad_clip=1.0,
        bf16=False,
        hidden_size=cfg.hidden_size,
    )
    dims = ParallelDims(info.world_size, rank=info.rank)
    model = build_model(
        cfg, experts, dims, ds, torch.float32, torch.device("cpu"), None, seed=0, activation_checkpointing=False
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds, dist_init_required=False
    )
    torch.manual_seed(info.rank)
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (1, 64))
        out = engine(ids, labels=ids)
        engine.backward(out.loss + out.aux_loss)
        engine.step()
    print(f"rank {info.rank} completed, loss {out.loss.item():.4f}", flush=True)
    destroy_distributed()
    hard_exit(0)


if __name__ == "__main__":
    main()
