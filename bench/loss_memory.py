"""Memory and time of the loss phase: the plain LM head against the chunked linear + cross-entropy.

The loss phase is what the LM head does at the end of a training forward and the start of its
backward: hidden states (T, D) -> logits (T, V) -> fp32 cross-entropy sum, times the trainer's
factor, -> gradients of the hidden states and of the head's weight.  ``plain`` is today's model
(``lm_head`` then ``F.cross_entropy(logits.float(), ...)``, the logits held as the model's output
holds them); ``chunked`` is ``moe_train.models.common.loss.linear_cross_entropy`` with its default
memory budget.  fp32 on CPU, every token trained (the chunked head would skip ignored tokens).

Each variant runs in a fresh process (glibc's mmap threshold pinned, so freed buffers go back to
the OS and resident memory follows live tensors; /proc sampled every 2 ms by
``moe_train.engine.memory.PeakRSS``), in the order plain, chunked, chunked, plain (full size:
plain, chunked: each run is minutes of CPU).  Activation
memory = peak RSS above the line taken after weights, hidden states and labels exist, minus the
bytes of the gradients the phase ends holding (weight and hidden gradients: both variants end with
the same ones).  Time is process CPU time of the phase (wall time alongside).

    python -m bench.loss_memory            # T=8192, V=102,400, D=5120 (DeepSeek V2): ~8 min of CPU
    python -m bench.loss_memory --quick    # the same T and V, D=256: about 3 minutes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time

from bench.common import Result, machine, table

# mode: (tokens T, vocabulary V, hidden D, timed runs per process, chunked memory budget (None: its default))
MODES = {
    "test": (2048, 16384, 32, 1, 16 * 2**20),  # budget scaled with T x V: 8 chunks
    "quick": (8192, 102_400, 256, 1, None),
    "full": (8192, 102_400, 5120, 1, None),
}
FACTOR = 2 / 8192  # what the trainer multiplies the sum by (world * grad_accum / tokens)


def _phase(variant: str, hidden, weight, labels, budget: int | None):
    import torch.nn.functional as F

    from moe_train.models.common.loss import DEFAULT_BUDGET, linear_cross_entropy

    if variant == "plain":
        logits = hidden @ weight.T  # held until the step ends, as CausalLMOutput.logits is
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    else:
        loss = linear_cross_entropy(hidden, weight, labels, budget=budget or DEFAULT_BUDGET)
    (loss * FACTOR).backward()
    return loss.item()


def _worker(variant: str, mode: str, threads: int, budget: int | None) -> dict:
    import gc

    import torch

    from moe_train.engine.memory import PeakRSS
    from moe_train.models.common.loss import DEFAULT_BUDGET, chunk_tokens

    torch.set_num_threads(threads)
    T, V, D, runs, default_budget = MODES[mode]
    budget = budget or default_budget
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(V, D, generator=g) * D**-0.5).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    small = torch.randn(64, D, generator=g).requires_grad_()
    _phase(variant, small, weight, labels[:64], budget)  # warm-up: thread pools, kernels, code pages
    results = []
    for _ in range(runs):
        hidden = torch.randn(T, D, generator=g).requires_grad_()
        weight.grad = None
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        with PeakRSS() as rss:
            loss = _phase(variant, hidden, weight, labels, budget)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        grads = (hidden.grad.numel() + weight.grad.numel()) * 4
        results.append({"peak": rss.peak_delta, "grads": grads, "wall": seconds, "cpu": cpu, "loss": loss})
        del hidden
    chunk = chunk_tokens(V, torch.float32, budget or DEFAULT_BUDGET) if variant == "chunked" else T
    return {"runs": results, "chunk": min(chunk, T)}


def measure(mode: str, threads: int, budget: int | None) -> dict[str, list[dict]]:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # read by glibc when each child starts
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, list[dict]] = {"plain": [], "chunked": []}
    chunks = {}
    order = ("plain", "chunked") if mode == "full" else ("plain", "chunked", "chunked", "plain")
    for variant in order:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            r = pool.submit(_worker, variant, mode, threads, budget).result()
        out[variant] += r["runs"]
        chunks[variant] = r["chunk"]
    return out, chunks


def run(mode: str = "quick", threads: int = 1, budget: int | None = None) -> Result:
    T, V, D, _, _ = MODES[mode]
    runs, chunks = measure(mode, threads, budget)
    gib = 2**30
    fig = {}
    for v, rs in runs.items():
        fig[v] = {
            "activation": max(r["peak"] - r["grads"] for r in rs),
            "peak": max(r["peak"] for r in rs),
            "grads": rs[0]["grads"],
            "cpu": statistics.median(r["cpu"] for r in rs),
            "wall": statistics.median(r["wall"] for r in rs),
            "loss": rs[0]["loss"],
        }
    plain = fig["plain"]
    rows = [
        [v, chunks[v], f["peak"] / gib, f["grads"] / gib, f["activation"] / gib,
         f["activation"] / plain["activation"], f["cpu"], f["wall"], f["cpu"] / plain["cpu"], f"{f['loss']:.6g}"]
        for v, f in fig.items()
    ]  # fmt: skip
    figures = {
        "loss_activation_ratio": fig["chunked"]["activation"] / plain["activation"],
        "loss_time_ratio": fig["chunked"]["cpu"] / plain["cpu"],
        "loss_rel_diff": abs(fig["chunked"]["loss"] - plain["loss"]) / abs(plain["loss"]),
    }
    notes = (
        f"T={T} tokens, vocabulary {V:,}, hidden {D}, fp32 on CPU, every token trained; "
        f"logits {T * V * 4 / gib:.2f} GiB "
        f"in fp32, head weight {V * D * 4 / gib:.2f} GiB; {len(runs['plain'])} run(s) per variant, each variant in "
        f"{'1 fresh process' if mode == 'full' else '2 fresh processes (order plain, chunked, chunked, plain)'}; "
        f"activation and peak: the worst run, times: the median.  "
        f"{machine()}."
    )
    headers = ["variant", "tokens/chunk", "peak RSS GiB", "grads GiB", "activation GiB", "vs plain",
               "cpu s", "wall s", "time vs plain", "loss"]  # fmt: skip
    targets = {"loss_activation_ratio": ("<=", 0.15), "loss_time_ratio": ("<=", 1.1), "loss_rel_diff": ("<=", 1e-6)}
    return Result("Loss phase: plain LM head vs chunked linear + cross-entropy", figures, table(headers, rows), notes,
                  targets)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loss_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256 instead of 5120 (same T and V): ~3 minutes")
    parser.add_argument("--mode", choices=sorted(MODES), default=None, help="sizes; --quick is --mode quick")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1, as bench)")
    parser.add_argument("--budget-mib", type=int, default=None, help="chunked loss memory budget (default: its own)")
    args = parser.parse_args(argv)
    mode = args.mode or ("quick" if args.quick else "full")
    budget = args.budget_mib * 2**20 if args.budget_mib else None
    print(run(mode, args.threads, budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
