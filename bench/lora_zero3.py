"""P8 LoRA under ZeRO-3, 2 ranks (gloo, CPU): our LoRA vs our full fine-tuning vs PEFT ``target_parameters``.

Three engines built side by side on every rank from one seeded HF checkpoint of the P2 model
(DeepSeek-V2-Lite's structure at the tiny widths, shard-8 experts), all under the same DeepSpeed
ZeRO-3 config (the shipped one, see ``_ds_config``), fp32, the same token rows:

- ``moe-train lora``: our model with ``LoraConfig(rank 16)`` on every target (attention, dense and
  shared-expert projections, routed experts as rank-16 grouped GEMMs); the optimizer holds the adapters;
- ``moe-train full``: the same model trained in full;
- ``peft lora``: transformers 5's ``DeepseekV2ForCausalLM`` (grouped_mm experts, sdpa attention) with
  PEFT loading the adapters our LoRA model saves (``save_adapter``: the same targets, rank, alpha and
  initial values; the routed experts through ``target_parameters``, which builds W + s * B A per forward).

Steps interleaved round-robin (reversed every other round) after one warm-up each.  Per engine: median
step time, rank 0's CPU time, peak RSS above the start of a step, and the bytes the optimizer and the
gradients hold on a rank (DeepSpeed's fp32 master partitions, Adam's moments, the flat gradient
partitions), read from DeepSpeed's optimizer after the steps.

``--mode wide`` runs the same three engines on P7's model (hidden 512, expert intermediate 128, 6 layers,
balance loss off, 1024 tokens per rank), where GEMMs rather than calls set the step time.  ``--mode lite``
runs our two engines (no PEFT) at DeepSeek-V2-Lite's widths: 2 layers, 16 experts, vocabulary 512.
``--mode qwen3-test|qwen3-wide``: the three engines on Qwen3-MoE (PEFT on ``Qwen3MoeForCausalLM``).

Run: ``python -m bench.lora_zero3 [--mode MODE]`` (a key of ``MODES``); workers run under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import Result, cpu_ranks_env, table, torchrun_module

MODES = {
    # P2's model: layers, experts, top-k, tokens per rank per step (bench/zero3.py); timed rounds
    "test": dict(layers=2, experts=8, top_k=2, tokens=64, shard=4, rounds=1),
    "quick": dict(layers=12, experts=64, top_k=6, tokens=256, shard=8, rounds=3),
    "full": dict(layers=27, experts=64, top_k=6, tokens=256, shard=8, rounds=5),
    # P7's widths (hidden 512, expert intermediate 128, 6 layers, balance loss off), 1024 tokens per rank
    "wide": dict(layers=6, experts=64, top_k=6, tokens=1024, shard=8, rounds=3),
    # DeepSeek-V2-Lite's widths (hidden 2048, expert intermediate 1408, dense intermediate 10944, its MLA),
    # its first dense layer and one MoE layer of 16 experts (top-6), the tiny vocabulary: the optimizer and
    # gradient bytes at a real width, and a step time; no PEFT engine (a third copy of the base on each rank)
    "lite": dict(layers=2, experts=16, top_k=6, tokens=128, shard=8, rounds=1, peft=False),
    # Qwen3-MoE (every layer MoE, GQA, no shared expert) at the test and P7 widths, balance loss off; PEFT on
    # transformers' Qwen3MoeForCausalLM
    "qwen3-test": dict(layers=2, experts=8, top_k=2, tokens=64, shard=4, rounds=1, family="qwen3", hidden=64),
    "qwen3-wide": dict(layers=6, experts=64, top_k=6, tokens=1024, shard=8, rounds=3, family="qwen3", hidden=512),
}
RANK, ALPHA = 16, 32.0


def _config(mode: str):
    """(config, expert layout): P2's model of this mode (``bench/zero3.py``) with shard-8 experts."""
    from bench.ep import _p7_config
    from bench.zero3 import model_config

    if mode == "wide":
        return _p7_config("quick", 2, expert_in_one_shard=MODES[mode]["shard"])  # P7's 2-rank shape
    if MODES[mode].get("family") == "qwen3":
        from moe_train.models.common.experts import ExpertLayout
        from moe_train.models.qwen3_moe.config import Qwen3MoeConfig

        m = MODES[mode]
        cfg = Qwen3MoeConfig.from_name(
            "tiny",
            num_hidden_layers=m["layers"],
            num_experts=m["experts"],
            num_experts_per_tok=m["top_k"],
            hidden_size=m["hidden"],
            moe_intermediate_size=m["hidden"] // 4,
            intermediate_size=4 * m["hidden"],
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=m["hidden"] // 8,
            mlp_only_layers=[],
            router_aux_loss_coef=0.0,
        )
        return cfg, ExpertLayout("shard", m["shard"])
    if mode == "lite":
        from moe_train.models.common.experts import ExpertLayout
        from moe_train.models.deepseek_v2.config import DeepseekV2Config

        m = MODES[mode]
        # vocabulary 512: the head and embeddings LoRA leaves untouched would otherwise be most of a 2-layer
        # model's parameters and flatter the ratio; the 27-layer model's are 3% of it
        cfg = DeepseekV2Config.from_name(
            "deepseek-v2-lite",
            num_hidden_layers=m["layers"],
            n_routed_experts=m["experts"],
            vocab_size=512,
            bos_token_id=0,
            eos_token_id=1,
        )
        return cfg, ExpertLayout("shard", m["shard"])
    return model_config(mode, "shard", MODES[mode]["shard"])


def _ds_config(world: int, hidden: int) -> dict:
    """The shipped ZeRO-3 config, filled as the trainer fills it.  Not P2's release-after-use variant
    (``stage3_max_live_parameters`` = ``stage3_max_reuse_distance`` = 0): under it PEFT's
    ``target_parameters`` fails (its B A delta is built outside the experts' forward, so ZeRO-3 has
    released the adapters when autograd needs them: "The size of tensor a (0) must match the size of
    tensor b (16)"), so for the tiny model every engine keeps its weights gathered from forward to backward."""
    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config

    return fill_auto(
        load_deepspeed_config("deepspeed_zero3"),
        micro_batch_size=1,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        bf16=False,
        hidden_size=hidden,
    )


def _lora():
    from moe_train.models.common.lora import LoraConfig

    return LoraConfig(rank=RANK, alpha=ALPHA)


def _write_sources(mode: str, base: str, adapter: str) -> None:
    """One seeded HF checkpoint every engine loads, and the adapters (PEFT layout) our LoRA model starts from."""
    from moe_train.checkpoint.adapters import save_adapter
    from moe_train.checkpoint.hf_layout import load_into, save_pretrained
    from moe_train.engine.weights import SeededInit
    from moe_train.models import spec_of
    from moe_train.models.common.lora import apply_lora

    cfg, layout = _config(mode)
    with torch.device("meta"):
        model = spec_of(cfg).build(cfg, layout)
    model = model.to_empty(device="cpu")
    load_into(model, SeededInit(model, seed=0))
    save_pretrained(model, base)
    torch.manual_seed(0)
    apply_lora(model, _lora())
    save_adapter(model, adapter, _lora(), lambda params: contextlib.nullcontext(), base_url=base)


def _ours(mode: str, ds: dict, source: str, lora):
    import deepspeed

    from moe_train.engine.model import build_model
    from moe_train.parallel import ParallelDims

    cfg, layout = _config(mode)
    dims = ParallelDims(dist.get_world_size(), rank=dist.get_rank())
    model = build_model(
        cfg,
        layout,
        dims,
        ds,
        torch.float32,
        torch.device("cpu"),
        source,
        seed=0,
        activation_checkpointing=False,
        lora=lora,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    return engine


def _peft(ds: dict, source: str, adapter: str):
    import deepspeed
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm"
    )
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    return engine


def optimizer_and_grad_bytes(engine) -> dict[str, int]:
    """What DeepSpeed ZeRO-3 holds on this rank for the trained parameters: the fp32 master partitions,
    Adam's moments, and the flat gradient partitions (the reduce bucket, fixed by the config, apart)."""
    opt = engine.optimizer

    def nbytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    master = sum(nbytes(t) for t in opt.fp32_partitioned_groups_flat)
    adam = sum(nbytes(v) for state in opt.optimizer.state.values() for k, v in state.items() if k != "step")
    grads = nbytes(opt.grad_partitions_flat_buffer)
    bucket = sum(nbytes(b.buffer) for b in opt.ipg_buckets.values() if getattr(b, "buffer", None) is not None)
    return {"master": master, "adam": adam, "grads": grads, "reduce_bucket": bucket}


def worker(mode: str, out_path: str, tmp: str) -> None:
    from bench.ep import _hf_step, _our_step, _row, _timed_rounds
    from moe_train.engine.distributed import destroy_distributed, hard_exit, init_distributed

    code = 0
    try:
        info = init_distributed("pytorch")
        torch.set_num_threads(1)
        base, adapter = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
        if info.rank == 0:
            _write_sources(mode, base, adapter)
        dist.barrier()
        cfg, _ = _config(mode)
        ds = _ds_config(dist.get_world_size(), cfg.hidden_size)
        engines = {
            "moe-train lora": _ours(mode, ds, base, _lora()),
            "moe-train full": _ours(mode, ds, base, None),
        }
        if MODES[mode].get("peft", True):
            engines["peft lora"] = _peft(ds, base, adapter)
        ids = _row(MODES[mode]["tokens"], info.rank, cfg.vocab_size)
        steps = {
            name: (_hf_step if name.startswith("peft") else _our_step)(engine, ids) for name, engine in engines.items()
        }
        rec = _timed_rounds(steps, MODES[mode]["rounds"])
        out = []
        for name, engine in engines.items():
            r = rec[name]
            out.append(
                {
                    "variant": name,
                    "step_s": statistics.median(r["times"]),
                    "cpu_s": statistics.median(r["cpu"]),
                    "peak_rss": max(r["rss"]),
                    "loss": r["first_loss"],
                    "trained": sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad),
                    "ranks": dist.get_world_size(),
                    **optimizer_and_grad_bytes(engine),
                }
            )
        for engine in engines.values():
            engine.destroy()
        if info.rank == 0:
            Path(out_path).write_text(json.dumps(out))
        destroy_distributed()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    hard_exit(code)


def summary(mode: str, records: list[dict]) -> Result:
    m = MODES[mode]
    by = {r["variant"]: r for r in records}
    lora, full, peft = by["moe-train lora"], by["moe-train full"], by.get("peft lora")
    MiB = 2**20

    def states(r: dict) -> int:
        return r["master"] + r["adam"] + r["grads"]

    rows = [
        [
            r["variant"],
            r["step_s"] * 1e3,
            r["cpu_s"] * 1e3,
            lora["step_s"] / r["step_s"],
            r["peak_rss"] / MiB,
            r["trained"],
            r["master"] / MiB,
            r["adam"] / MiB,
            r["grads"] / MiB,
            states(r) / states(full),
            f"{r['loss']:.6f}",
        ]
        for r in records
    ]
    figures = {
        "p8_lora_step_vs_full": lora["step_s"] / full["step_s"],
        "p8_lora_cpu_vs_full": lora["cpu_s"] / full["cpu_s"],
        "p8_lora_states_vs_full": states(lora) / states(full),
    }
    if peft is not None:
        figures["p8_peft_step_vs_lora"] = peft["step_s"] / lora["step_s"]
        figures["p8_peft_cpu_vs_lora"] = peft["cpu_s"] / lora["cpu_s"]
        figures["p8_step1_loss_diff"] = abs(peft["loss"] - lora["loss"])
    headers = [
        "engine",
        "step ms",
        "CPU ms (rank 0)",
        "ours-LoRA step / this",
        "peak RSS MiB (step)",
        "trained params",
        "fp32 master MiB",
        "Adam m+v MiB",
        "grad partitions MiB",
        "optimizer+grads / full",
        "step-1 loss",
    ]
    cfg, _ = _config(mode)
    model = {"wide": "P7", "lite": "DeepSeek-V2-Lite-width", "qwen3-test": "Qwen3-MoE", "qwen3-wide": "Qwen3-MoE"}
    first = "every layer MoE, balance loss off" if m.get("family") == "qwen3" else "first dense"
    targets = "attention, dense, shared and routed experts"
    notes = (
        f"{model.get(mode, 'P2')} model: {m['layers']} layers ({first}), {m['experts']} experts "
        f"top-{m['top_k']} in shards of {m['shard']} (ours), hidden {cfg.hidden_size}, expert intermediate "
        f"{cfg.moe_intermediate_size}, vocabulary {cfg.vocab_size}, {m['tokens']} tokens per rank per step, "
        f"{lora['ranks']} ranks on gloo, ZeRO-3 "
        f"(the shipped config), fp32; LoRA rank {RANK}, alpha {ALPHA:g} on "
        f"{'attention and routed experts (no dense or shared MLP here)' if m.get('family') == 'qwen3' else targets} "
        f"for {'both LoRA engines (PEFT loads our initial adapters)' if peft else 'our LoRA'}; "
        f"median of {m['rounds']} "
        "interleaved steps after one warm-up. Memory per rank, rank 0. CPU ms: rank 0's process time, steadier "
        "than wall time on a loaded machine."
    )
    if peft is not None and mode != "wide" and m.get("family") != "qwen3":  # the others run without it
        notes += " Step-1 loss: ours adds the model's balance loss, transformers computes none."
    targets = {
        "p8_lora_step_vs_full": ("<=", 0.7),
        "p8_peft_step_vs_lora": (">=", 2),
        "p8_lora_states_vs_full": ("<=", 0.05),
    }
    targets = {k: v for k, v in targets.items() if k in figures}
    return Result(
        f"P8 LoRA vs full{' vs PEFT target_parameters' if peft else ''}, ZeRO-3, {lora['ranks']} ranks on gloo",
        figures,
        table(headers, rows),
        notes,
        targets,
    )


def run(mode: str = "quick", ranks: int = 2) -> Result:
    """The benchmark on ``ranks`` CPU processes (2 for every recorded figure; the suite's smoke run takes 1)."""
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        out = os.path.join(tmp, "records.json")
        cmd = [*torchrun_module("bench.lora_zero3", ranks), "--worker", "--mode", mode, "--out", out, "--tmp", tmp]
        proc = subprocess.run(cmd, env=cpu_ranks_env(tmp), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"LoRA benchmark workers failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return summary(mode, json.loads(Path(out).read_text()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank (internal)")
    parser.add_argument("--mode", choices=list(MODES), default="quick", help="problem size")
    parser.add_argument("--out", help="where rank 0 writes its records (worker only)")
    parser.add_argument("--tmp", help="scratch directory shared by the ranks (worker only)")
    args = parser.parse_args()
    if args.worker:
        worker(args.mode, args.out, args.tmp)
    else:
        t0 = time.perf_counter()
        print(run(args.mode))
        print(f"(took {time.perf_counter() - t0:.0f} s)")
