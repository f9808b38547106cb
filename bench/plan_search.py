"""Wall time of ``moe-train plan --search`` on the clusters docs/planner.md quotes (one process, this machine).

The search is a pure function of the model and the cluster; what it costs is the module trace replays
(memory: the gathered working set; speed: the timeline) and the per-layer costs, all memoised (see
``moe_train/plan/search.py``).  Run: ``python -m bench.plan_search [--only v2-128,v3-256]``.
"""

from __future__ import annotations

import argparse
import time

from moe_train.plan import build_plan
from moe_train.plan.command import run_search
from moe_train.recipes import get_recipe

CASES = {
    "v2-64": ("deepseek_v2_chat_full_alpaca_e3", 64),
    "v2-128": ("deepseek_v2_chat_full_alpaca_e3", 128),
    "v3-256": ("deepseek_v3_full_alpaca_e3", 256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CASES), help="comma separated: " + ", ".join(CASES))
    args = parser.parse_args()
    print(f"| case | recipe | GPUs | space | timed | search s | #1 | TGS | GB |\n|{'---|' * 9}")
    for case in args.only.split(","):
        name, gpus = CASES[case]
        r = get_recipe(name)
        p = build_plan(r, gpus, 80, nodes=gpus // 8)
        t = time.perf_counter()
        found = run_search(p, r.grad_accum)
        took = time.perf_counter() - t
        top = found.best[0]
        print(
            f"| {case} | {name} | {gpus} | {found.space} | {found.timed} | {took:.1f} | {top.candidate.label()} | "
            f"{top.tgs:.1f} | {top.per_gpu_gb:.1f} |"
        )


if __name__ == "__main__":
    main()
