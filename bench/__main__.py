"""``python -m bench [--quick] [--json] [--only p1,p3]``: the benchmark suite, side by side in one run.

P1 MoE layer layouts, P2 ZeRO-3 collectives and step time, P3 packing, P4 streamed HF export, P5 training
checkpoints (ours vs DeepSpeed native).  See
each module's docstring for what is compared, and bench/RESULTS.md for recorded runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

BENCHMARKS = {
    "p1": "bench.moe_layer",
    "p2": "bench.zero3",
    "p3": "bench.packing",
    "p4": "bench.export",
    "p5": "bench.checkpoint",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: the whole suite in under 5 minutes")
    parser.add_argument(
        "--mode",
        choices=("test", "quick", "full"),
        default=None,
        help="problem sizes (--quick is --mode quick; test: the smallest, checks the code only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures, nothing else")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS)
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for P1, P3, P4 (P2 ranks use 1 each); default 1, see RESULTS.md",
    )
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import importlib

    import torch

    from bench.common import machine

    torch.set_num_threads(args.threads)
    mode = args.mode or ("quick" if args.quick else "full")
    figures: dict[str, float] = {}
    # With --json everything but the final object goes to stderr, so stdout parses as JSON.
    out = sys.stderr if args.json else sys.stdout
    print(f"# moe-train benchmarks ({mode})\n\n{machine()}\n", file=out, flush=True)
    with contextlib.redirect_stdout(out):
        for name in chosen:
            t0 = time.perf_counter()
            result = importlib.import_module(BENCHMARKS[name]).run(mode)
            figures.update(result.figures)
            print(f"{result}\n({name} took {time.perf_counter() - t0:.0f} s)\n", flush=True)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
