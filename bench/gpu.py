"""One-GPU training throughput of ``shard`` against ``origin``: TGS and MFU, appended to RESULTS.md.

A DeepSeek-V2-Lite-shaped model (every width as published, fewer layers), bf16 weights, flash-attn
when installed, packed alpaca-like data: each step trains one packed row of ``--tokens`` tokens
(forward, backward, AdamW).  Sized so one run gives the table in well under 5 minutes on an
H100/H200:

    python -m bench.gpu                  # both layouts, appends a section to bench/RESULTS.md
    python -m bench.gpu --cpu-dry-run    # the tiny config on CPU, fp32: checks the script, writes nothing

TGS: trained tokens per GPU per second.  MFU: model FLOPs (``moe_train.engine.metrics.step_flops``:
6 x active matmul parameters x tokens + causal attention over each packed sample) per second over
the card's dense bf16 peak (``PEAK_TFLOPS``; ``--peak-tflops`` for a card not listed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import table
from bench.packing import alpaca_like_samples
from moe_train.data.packing import pack
from moe_train.engine.metrics import peak_tflops, step_flops
from moe_train.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM

RESULTS = Path(__file__).with_name("RESULTS.md")


def build(cfg: DeepseekV2Config, device: torch.device, dtype: torch.dtype) -> DeepseekV2ForCausalLM:
    """The model with seeded weights that depend on the checkpoint key only: both layouts start equal."""
    from moe_train.checkpoint.hf_layout import load_into
    from moe_train.engine.weights import open_source

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    load_into(model, open_source(cfg, model, None, seed=0))
    return model.train()


def packed_rows(vocab: int, tokens: int, count: int) -> list[dict]:
    """`count` packed rows of at most `tokens` tokens, alpaca-like samples."""
    samples = alpaca_like_samples(count * tokens // 100, vocab, tokens, seed=0)  # mean length ~190: enough
    packs, _ = pack(samples, tokens, varlen=True)
    if len(packs) < count:
        raise RuntimeError(f"only {len(packs)} packs of {tokens} tokens, {count} needed")
    rows = []
    for p in packs[:count]:
        cu = p.cu_seqlens
        rows.append({"input_ids": p.input_ids[None].long(), "labels": p.labels[None].long(),
                     "position_ids": p.position_ids[None].long(), "cu_seqlens": cu,
                     "lengths": (cu[1:] - cu[:-1]).tolist()})
    return rows


def measure(cfg: DeepseekV2Config, rows: list[dict], warmup: int, device: torch.device,
            dtype: torch.dtype) -> dict:
    model = build(cfg, device, dtype)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, tokens, flops = [], [], []
    for i, row in enumerate(rows):
        sync()
        t0 = time.perf_counter()
        out = model(row["input_ids"].to(device), position_ids=row["position_ids"].to(device),
                    cu_seqlens=row["cu_seqlens"].to(device), labels=row["labels"].to(device))
        loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(row["input_ids"].numel())
            flops.append(step_flops(cfg, row["lengths"]))
    peak_mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(times)
    return {"step_s": step_s, "tgs": sum(tokens) / sum(times), "tflops": sum(flops) / sum(times) / 1e12,
            "peak_mem_gb": peak_mem, "loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny config, fp32 on CPU, a few steps; prints the table, appends nothing")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense, as in V2-Lite)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per packed row (one row per step)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--expert-in-one-shard", type=int, default=8, help="experts per shard for `shard`")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this card, if not listed")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"markdown file to append the table to (default {RESULTS.name}; none in a dry run)")
    args = parser.parse_args(argv)

    if args.cpu_dry_run:
        device, dtype, card = torch.device("cpu"), torch.float32, "CPU dry run"
        base = DeepseekV2Config.from_name("tiny")
        tokens, steps, warmup = 256, 2, 1
        model_desc = f"the tiny config ({base.num_hidden_layers} layers)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --cpu-dry-run to check the script")
        device, dtype, card = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
        base = DeepseekV2Config.from_name("deepseek-v2-lite", num_hidden_layers=args.layers)
        tokens, steps, warmup = args.tokens, args.steps, args.warmup
        model_desc = f"{base.num_hidden_layers} layers of DeepSeek-V2-Lite widths"
    peak = peak_tflops(args.peak_tflops) if not args.cpu_dry_run else None
    rows = packed_rows(base.vocab_size, tokens, warmup + steps)
    layouts = {"shard": base.replace(moe_implementation="shard", expert_in_one_shard=args.expert_in_one_shard),
               "origin": base.replace(moe_implementation="origin", expert_in_one_shard=None)}
    results = {name: measure(cfg, rows, warmup, device, dtype) for name, cfg in layouts.items()}

    from moe_train.models.common.attention import resolve_backend

    attn = resolve_backend("auto", device)
    table_rows = [[name, r["step_s"] * 1e3, r["tgs"], r["tflops"], f"{r['tflops'] / peak:.1%}" if peak else "-",
                   r["peak_mem_gb"], results["origin"]["step_s"] / r["step_s"], f"{r['loss']:.4f}"]
                  for name, r in results.items()]
    text = table(["layout", "step ms", "TGS", "TFLOP/s", "MFU", "peak GiB", "speedup vs origin", "last loss"],
                 table_rows)
    cmd = "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    section = (f"\n### GPU: {card}, {datetime.date.today().isoformat()}\n\n"
               f"`{cmd.strip()}`: {model_desc}, {dtype}, "
               f"attention {attn}, one packed row of <= {tokens} tokens per step, AdamW; "
               f"median of {steps} steps after {warmup} warm-up; shard = {args.expert_in_one_shard} experts per shard; "
               f"peak {peak or '?'} TFLOP/s.\n\n{text}\n")
    print(section)
    target = args.results if args.results is not None else (None if args.cpu_dry_run else RESULTS)
    if target is not None:
        with open(target, "a") as f:
            f.write(section)
        print(f"appended to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
