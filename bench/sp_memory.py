"""Activation memory per rank with sequence parallelism: --sp 1 on one process vs --sp 2 on two.

One packed row of several thousand tokens goes through forward + backward of a widened tiny model
(fp32, CPU, gloo).  Each variant runs in fresh processes and reports, per rank:

- the peak RSS above the resident size just before the step (parameters, their gradients, already
  allocated, and a warm-up step on a short row are below that line): the memory the step really
  took.  glibc's mmap threshold is pinned so freed activations go back to the OS instead of
  staying in the heap, and /proc is sampled every 2 ms (``moe_train.engine.memory.PeakRSS``);
- the bytes autograd saved for backward (distinct storages, parameters left out): the activations
  alone, without the step's transient buffers, counted exactly.

With --sp 2 every rank keeps half the row; attention sees the whole row but half the heads, so
both figures should come close to half, plus the all-to-all buffers.  On CPU, SDPA takes its math
path here (3-D inputs, q/k and v head dims differ), which keeps each sample's T x T attention weights
per head; those halve too (half the heads per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import Result, machine, table
from moe_train.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM

# Tiny, four times wider, with four layers: attention of 8 heads (q/k 48, v 32), 8 experts top-2.
WIDE = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=16384,
)
# mode: (config overrides, tokens in the row, samples packed in it): samples of 256 or 512 tokens,
# as SFT data packs, which keeps the T x T attention weights of the CPU path (see above) a minor share.
MODES = {"test": ({}, 512, 2), "quick": (WIDE, 4096, 8), "full": (WIDE, 8192, 16)}


def packed_row(tokens: int, samples: int, vocab: int) -> dict:
    """A packed row of `samples` equal samples, every token trained (a PackedLoader batch)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (1, tokens), generator=g)
    bounds = torch.linspace(0, tokens, samples + 1).round().to(torch.int32)
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": position_ids,
        "cu_seqlens": bounds,
        "max_seqlen": max(lengths),
        "num_loss_tokens": tokens - samples,
    }


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward, parameters left out."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _worker(rank: int, sp: int, mode: str, out_dir: str) -> None:
    from moe_train.engine.distributed import hard_exit
    from moe_train.engine.memory import PeakRSS
    from moe_train.models.common.experts import ExpertLayout
    from moe_train.models.common.loss import cross_entropy, shift_labels
    from moe_train.models.deepseek_v2 import SPEC
    from moe_train.parallel import ParallelDims

    overrides, tokens, samples = MODES[mode]
    cfg = DeepseekV2Config.from_name("tiny", **overrides)
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(cfg, ExpertLayout("shard", 4), attn_backend="sdpa").train()
    for p in model.parameters():  # gradients exist before the measured step, as in training
        p.grad = torch.zeros_like(p)
    seq = None
    if sp > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=sp)
        dims = ParallelDims(sp, sp=sp, rank=rank)
        dims.create_groups()
        seq = dims.seq
        seq.apply(model, SPEC)

    def fwd_bwd(batch: dict) -> None:
        ntok = batch["num_loss_tokens"]
        if seq is not None:
            batch = seq.shard(batch, pad_id=0)
        out = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            segment_ids=batch.get("segment_ids"),
        )
        targets = batch["targets"] if seq is not None else shift_labels(batch["labels"])
        ce = cross_entropy(out.logits, targets)
        (ce * sp / ntok + out.aux_loss).backward()

    fwd_bwd(packed_row(256, 2, cfg.vocab_size))  # warm-up: thread pools, kernels, lazy state
    row = packed_row(tokens, samples, cfg.vocab_size)
    if seq is not None:
        dist.barrier()
    t0 = time.perf_counter()
    with PeakRSS() as rss, SavedActivations(model) as saved:
        fwd_bwd(row)
    seconds = time.perf_counter() - t0
    Path(out_dir, f"sp{sp}_rank{rank}.json").write_text(
        json.dumps({"tokens": -(-tokens // sp), "rss": rss.peak_delta, "saved": saved.bytes, "seconds": seconds})
    )
    if seq is not None:
        dist.barrier()
        dist.destroy_process_group()
    hard_exit(0)  # skip interpreter shutdown (gloo can abort there, see moe_train.engine.distributed)


def measure(sp: int, mode: str) -> list[dict]:
    """Per-rank figures of one variant, run in `sp` fresh processes."""
    import torch.multiprocessing as mp

    # Pinned, so that glibc hands large freed blocks back to the OS and RSS follows live memory.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="moe-train-sp-memory-") as out_dir:
        mp.spawn(_worker, args=(sp, mode, out_dir), nprocs=sp, join=True)
        return [json.loads(Path(out_dir, f"sp{sp}_rank{r}.json").read_text()) for r in range(sp)]


def run(mode: str = "quick") -> Result:
    overrides, tokens, samples = MODES[mode]
    per_sp = {sp: measure(sp, mode) for sp in (1, 2)}
    worst = {
        sp: {key: max(r[key] for r in ranks) for key in ("rss", "saved", "seconds")} for sp, ranks in per_sp.items()
    }
    mib = 2**20
    rows = [
        [
            sp,
            per_sp[sp][0]["tokens"],
            worst[sp]["rss"] / mib,
            worst[sp]["saved"] / mib,
            worst[sp]["rss"] / worst[1]["rss"],
            worst[sp]["seconds"],
        ]
        for sp in (1, 2)
    ]
    figures = {
        "sp2_rss_ratio": worst[2]["rss"] / worst[1]["rss"],
        "sp2_saved_ratio": worst[2]["saved"] / worst[1]["saved"],
    }
    cfg = DeepseekV2Config.from_name("tiny", **overrides)
    notes = (
        f"One packed row of {tokens} tokens ({samples} samples), forward + backward in fp32 on CPU; "
        f"{'widened ' if overrides else ''}tiny config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads (q/k {cfg.qk_head_dim}, v {cfg.v_head_dim}), {cfg.n_routed_experts} "
        f"experts top-{cfg.num_experts_per_tok}; the worst rank of each variant.  {machine()}."
    )
    return Result(
        "Sequence parallelism: activation memory per rank",
        figures,
        table(["sp", "tokens/rank", "peak RSS delta MiB", "saved activations MiB", "RSS / sp1", "fwd+bwd s"], rows),
        notes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        default="quick",
        help="test: tiny config, 512 tokens; quick: wider config, 4096 tokens; full: 8192 tokens",
    )
    print(run(parser.parse_args().mode))


if __name__ == "__main__":
    main()
