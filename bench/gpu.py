"""The one GPU verification script: GPU tests, MoE layer TFLOP/s, training TGS/MFU; a section of RESULTS.md.

Runs on an air-gapped CUDA node that has only PyTorch (>= 2.11) and transformers installed: the
project from its source tree, DeepSpeed and its pure-Python dependencies from the wheels of
``make gpu-bundle`` (``.whl/``, unpacked to a temporary directory, the node's environment
untouched), flash-attn when installed, else torch's own ``torch.nn.attention.varlen.varlen_attn``
(CUDA only; ``varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
window_size=(-1, -1), ...)``, causal as ``window_size=(-1, 0)``), anything else skipped with a
line saying why.  In well under 5 minutes on one H100/H200:

1. ``pytest -m gpu tests/test_gpu.py`` (flash/varlen vs SDPA, bf16 grouped_mm vs the loop, the
   chunked loss on CUDA, one ZeRO-3 nccl step);
2. the MoE layer at DeepSeek-V2-Lite widths (hidden 2048, 64 experts of 1408, top-6, 2 shared),
   forward + backward in bf16: ``shard`` vs ``origin`` vs every transformers
   ``experts_implementation`` vs a dense GEMM of the same FLOPs, in TFLOP/s;
3. training steps (forward, backward, AdamW) of a DeepSeek-V2-Lite-width model at reduced depth,
   bf16, packed varlen rows of 4k and 8k tokens: ``shard`` vs ``origin`` vs transformers' model
   with the fastest ``experts_implementation`` of step 2, in TGS and MFU.

    PYTHONPATH=. python -m bench.gpu                # appends a section to bench/RESULTS.md
    PYTHONPATH=. python -m bench.gpu --cpu-dry-run  # tiny sizes, fp32 on CPU, seconds: checks the script

TGS: trained tokens per GPU per second.  MFU: model FLOPs (``moe_train.engine.metrics.step_flops``:
6 x active matmul parameters x tokens + causal attention inside each packed sample; the same count
for every variant) per second over the card's dense bf16 peak (``--peak-tflops`` for a card not
listed).  Goals on one H100/H200: MFU >= 35%, shard >= 3x origin and >= 1.3x transformers' best on
the MoE layer.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import table
from bench.moe_layer import LayerSize, build_layers, fwd_bwd
from bench.packing import alpaca_like_samples
from moe_train.data.packing import pack
from moe_train.engine.metrics import peak_tflops, step_flops
from moe_train.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("RESULTS.md")
LITE_LAYER = LayerSize(hidden=2048, expert_ffn=1408, tokens=8192)  # DeepSeek-V2-Lite's MoE layer
TINY_LAYER = LayerSize(hidden=64, expert_ffn=32, tokens=256, experts=8, top_k=2, expert_in_one_shard=4)
TARGETS = {"mfu": 0.35, "layer_vs_origin": 3.0, "layer_vs_hf": 1.3}


# ---------------------------------------------------------------------------- environment
def prepare(device: torch.device, wheels: Path) -> tuple[list[str], str]:
    """What runs, one line each (with why, for what is skipped), and the attention kernel taken.

    Makes DeepSpeed importable from the bundle when the node lacks it, and on CUDA without
    flash-attn routes the model's varlen attention to torch's kernel.
    """
    from moe_train.models.common import attention

    lines = [f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability()
        lines.append(f"device {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    import transformers

    lines.append(f"transformers {transformers.__version__}")
    if importlib.util.find_spec("deepspeed") is None and any(wheels.glob("deepspeed-*.whl")):
        from bench.bundle import install_bundle

        added = install_bundle(wheels, Path(tempfile.mkdtemp(prefix="moe-train-wheels-")))
        lines.append(f"from the wheels in {wheels}: {', '.join(added)}")
    if importlib.util.find_spec("deepspeed") is None:
        lines.append(f"deepspeed: not importable and no wheels in {wheels} (run `make gpu-bundle` where pip "
                     "reaches PyPI, copy .whl/): the ZeRO-3 test skips")  # fmt: skip
    else:
        lines.append(f"deepspeed {importlib.metadata.version('deepspeed')}")
    lines.append("F.grouped_mm: " + ("present" if hasattr(F, "grouped_mm") else "absent (torch < 2.10): experts loop"))
    if device.type != "cuda":
        kernel = "SDPA per sample (CPU)"
    elif attention.flash_attn_varlen_func is not None:
        kernel = "flash-attn varlen"
    elif attention.varlen_kernel() is not None:  # the model takes torch's own kernel by itself
        kernel = "torch varlen_attn (flash-attn not installed)"
    else:
        kernel = "SDPA per sample (neither flash-attn nor torch.nn.attention.varlen: slow)"
    lines.append(f"attention: {kernel}")
    return lines, kernel


def run_gpu_tests(dry_run: bool, timeout: int) -> str:
    if dry_run:
        return "GPU tests: not run in a CPU dry run (they skip without CUDA)"
    if importlib.util.find_spec("pytest") is None:
        return "GPU tests: skipped, pytest is not installed (it is in the `make gpu-bundle` wheels)"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"GPU tests: timed out after {timeout} s"
    out = proc.stdout.strip().splitlines()
    summary = out[-1] if out else proc.stderr.strip()[-300:]
    failed = [line for line in out if line.startswith(("FAILED", "ERROR"))]
    return f"GPU tests (`{' '.join(cmd[2:])}`): {summary}" + "".join(f"\n  - {f}" for f in failed)


# ---------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` after `warmup` untimed calls (CUDA-synchronised)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------- MoE layer
def layer_section(size: LayerSize, device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[str, dict, str]:
    """Table of the MoE layer variants and the dense GEMM; figures; the fastest transformers variant."""
    layers = {name: layer.to(device=device, dtype=dtype).train() for name, layer in build_layers(size).items()}
    x = torch.randn(1, size.tokens, size.hidden, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    gemms = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
             for m, k, n in size.gemms()]  # fmt: skip
    times, skipped = {"dense GEMM": timed(lambda ops=gemms: [a @ b for a, b in ops], device, 2, repeats)}, {}
    for name, layer in layers.items():
        if name == "hf-batched_mm" and size.assignments * 3 * size.expert_ffn * size.hidden * 2 > 8 * 2**30:
            skipped[name] = "would materialise per-token expert weights (over 8 GiB)"
            continue
        try:
            times[name] = timed(lambda n=name, m=layer, x=x, g=g: fwd_bwd(n, m, x, g), device, 2, repeats)
        except Exception as e:  # noqa: BLE001 - a kernel this card, dtype or install lacks: skipped, with why
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}" if str(e) else type(e).__name__
        free(device)
    hf = {n: t for n, t in times.items() if n.startswith("hf-")}
    best_hf = min(hf, key=hf.get) if hf else None
    rows = [
        [n, t * 1e3, size.flops / t / 1e12, times["shard"] / t if "shard" in times else "-"] for n, t in times.items()
    ]
    rows += [[n, "-", "-", f"skipped: {why}"] for n, why in skipped.items()]
    figures = {
        "layer_vs_origin": times["origin"] / times["shard"],
        "layer_shard_vs_dense": times["dense GEMM"] / times["shard"],
    }
    if best_hf:
        figures["layer_vs_hf"] = times[best_hf] / times["shard"]
    text = (f"{size}; {size.flops / 1e12:.2f} TFLOP per forward + backward; median of {repeats}.\n\n"
            + table(["variant", "ms", "TFLOP/s", "speed vs shard"], rows))  # fmt: skip
    del layers, x, g, gemms
    free(device)
    return text, figures, (best_hf or "hf-grouped_mm").removeprefix("hf-")


# ---------------------------------------------------------------------------- training steps
def build_ours(cfg: DeepseekV2Config, layout, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Seeded weights that depend on the checkpoint key only: shard and origin start equal."""
    from moe_train.checkpoint.hf_layout import load_into
    from moe_train.engine.weights import open_source

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg, layout)
    model = model.to_empty(device=device).to(dtype)
    load_into(model, open_source(model, None, seed=0))
    return model.train()


def build_hf(cfg: DeepseekV2Config, device: torch.device, dtype: torch.dtype, experts: str) -> torch.nn.Module:
    """transformers' DeepseekV2ForCausalLM of the same config, `experts` as its experts_implementation."""
    from transformers import DeepseekV2Config as HFConfig
    from transformers import DeepseekV2ForCausalLM as HFModel

    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_cfg = HFConfig(**d)
    hf_cfg._experts_implementation = experts
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    hf_cfg._attn_implementation = "flash_attention_2" if flash else "sdpa"  # packed rows: from position_ids
    torch.manual_seed(0)
    with torch.device(device):
        model = HFModel(hf_cfg)
    return model.to(dtype).train()


def packed_rows(vocab: int, tokens: int, count: int) -> list[dict]:
    samples = alpaca_like_samples(count * tokens // 100, vocab, tokens, seed=0)  # mean length ~190: enough
    packs, _ = pack(samples, tokens, varlen=True)
    if len(packs) < count:
        raise RuntimeError(f"only {len(packs)} packs of {tokens} tokens, {count} needed")
    return [{"input_ids": p.input_ids[None].long(), "labels": p.labels[None].long(),
             "position_ids": p.position_ids[None].long(), "cu_seqlens": p.cu_seqlens,
             "lengths": (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).tolist()} for p in packs[:count]]  # fmt: skip


def train_steps(model: torch.nn.Module, hf: bool, rows: list[dict], warmup: int, device: torch.device) -> dict:
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    times, losses = [], []
    for i, row in enumerate(rows):
        batch = {k: row[k].to(device) for k in ("input_ids", "position_ids", "labels")}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if hf:
            loss = model(**batch).loss
        else:
            out = model(batch["input_ids"], position_ids=batch["position_ids"],
                        cu_seqlens=row["cu_seqlens"].to(device), labels=batch["labels"])  # fmt: skip
            loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"seconds": times, "loss": losses[-1], "peak_gib": peak}


def model_section(
    base: DeepseekV2Config,
    token_counts: list[int],
    steps: int,
    warmup: int,
    shards: int,
    hf_experts: str,
    device: torch.device,
    dtype: torch.dtype,
    peak: float | None,
) -> tuple[str, dict]:
    from moe_train.models.common.experts import ExpertLayout

    layouts = {"shard": ExpertLayout("shard", shards), "origin": ExpertLayout("origin")}
    rows, figures = [], {}
    for tokens in token_counts:
        data = packed_rows(base.vocab_size, tokens, warmup + steps)
        flops = sum(step_flops(base, r["lengths"]) for r in data[warmup:])
        ntok = sum(r["input_ids"].numel() for r in data[warmup:])
        results = {}
        for name in [*layouts, f"hf-{hf_experts}"]:
            try:
                hf = name.startswith("hf-")
                model = (
                    build_hf(base, device, dtype, hf_experts) if hf else build_ours(base, layouts[name], device, dtype)
                )
                results[name] = train_steps(model, hf, data, warmup, device)
            except Exception as e:  # noqa: BLE001 - out of memory, or a kernel this install lacks: skipped, with why
                results[name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"}
            model = None
            free(device)
        base_t = sum(results["origin"]["seconds"]) if "seconds" in results["origin"] else None
        for name, r in results.items():
            if "skipped" in r:
                rows.append([name, tokens, "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"])
                continue
            t = sum(r["seconds"])
            mfu = flops / t / (peak * 1e12) if peak else None
            rows.append([name, tokens, statistics.median(r["seconds"]) * 1e3, ntok / t, flops / t / 1e12,
                         f"{mfu:.1%}" if mfu is not None else "-",
                         f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-",
                         base_t / t if base_t else "-", f"{r['loss']:.4f}"])  # fmt: skip
            if mfu is not None:
                figures[f"mfu_{name}_{tokens}"] = mfu
    headers = ["variant", "tokens", "step ms", "TGS", "TFLOP/s", "MFU", "peak GiB", "speed vs origin", "last loss"]
    return table(headers, rows), figures


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="tiny sizes, fp32 on CPU, a few steps: checks the script; appends only with --results",
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense, as in V2-Lite)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per variant and token count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--expert-in-one-shard", type=int, default=8, help="experts per shard for `shard`")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this card, if not listed")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the `make gpu-bundle` wheels")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"markdown file to append to (default {RESULTS.name}; none in a dry run)",
    )
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if args.cpu_dry_run:
        device, dtype, card = torch.device("cpu"), torch.float32, "CPU dry run"
        base = DeepseekV2Config.from_name("tiny")
        layer, tokens, steps, warmup, repeats = TINY_LAYER, [128, 256], 2, 1, 1
        model_desc = f"the tiny config ({base.num_hidden_layers} layers)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --cpu-dry-run to check the script")
        device, dtype, card = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
        base = DeepseekV2Config.from_name("deepseek-v2-lite", num_hidden_layers=args.layers)
        layer, tokens, steps, warmup, repeats = LITE_LAYER, args.tokens, args.steps, args.warmup, 5
        model_desc = f"{base.num_hidden_layers} layers of DeepSeek-V2-Lite widths"
    peak = None if args.cpu_dry_run else peak_tflops(args.peak_tflops)
    env_lines, kernel = prepare(device, args.wheels)
    for line in env_lines:
        print(line, flush=True)
    tests = "GPU tests: not run (--skip-tests)" if args.skip_tests else run_gpu_tests(args.cpu_dry_run, 240)
    print(tests, flush=True)
    layer_text, layer_fig, best_hf = layer_section(layer, device, dtype, repeats)
    print(layer_text, flush=True)
    model_text, model_fig = model_section(base, tokens, steps, warmup, args.expert_in_one_shard, best_hf, device,
                                          dtype, peak)  # fmt: skip
    print(model_text, flush=True)
    verdicts = []
    mfu = max((v for k, v in model_fig.items() if k.startswith("mfu_shard_")), default=None)
    for name, value in [("mfu", mfu), *((k, layer_fig.get(k)) for k in ("layer_vs_origin", "layer_vs_hf"))]:
        if value is not None:
            # the goals are GPU figures: a CPU dry run only shows the line is computed
            met = "met" if value >= TARGETS[name] else "NOT met"
            if args.cpu_dry_run:
                met = "not judged: a CPU dry run"
            verdicts.append(f"- {name} = {value:.3g} (goal >= {TARGETS[name]:g}: {met})")
    cmd = "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join([
        f"\n### GPU: {card}, {datetime.date.today().isoformat()}\n",
        f"`{cmd.strip()}`, {time.perf_counter() - t_start:.0f} s.\n",
        *(f"- {line}" for line in env_lines), f"- {tests}\n",
        f"#### MoE layer, forward + backward, {dtype}\n", layer_text + "\n",
        f"#### Training step: {model_desc}, {dtype}, attention {kernel}, AdamW\n",
        (f"One packed varlen row per step; median step of {steps} after {warmup} warm-up, TGS and TFLOP/s over "
         f"all timed steps; shard = {args.expert_in_one_shard} experts per shard; transformers: its "
         f"DeepseekV2ForCausalLM with experts_implementation={best_hf}; peak {peak or '?'} TFLOP/s.\n"),
        model_text + "\n", *verdicts, "",
    ])  # fmt: skip
    target = args.results if args.results is not None else (None if args.cpu_dry_run else RESULTS)
    if target is not None:
        with open(target, "a") as f:
            f.write(section)
        print(f"appended to {target}")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
