"""Data start-up on 2 ranks: today's reader (every rank reads, tokenizes and packs everything, and holds
every pack) against the tokenized cache (one rank builds, every rank memory-maps), side by side.

``python -m bench.data_cache [--samples 200000] [--baseline-ref main]``

The dataset is alpaca-shaped (instruction, input, output, text), generated from the shipped sample's
words at alpaca's length mix, written as Parquet for the cache and as JSONL for the baseline (the only
form today's reader takes).  The baseline is the ``moe_train`` package of ``--baseline-ref``, exported
with ``git archive`` into a temporary directory and imported from there.  Each variant runs as two real
processes on a gloo group; per rank it records the seconds (wall and CPU) from the group's start to
its loader and resume fingerprint being ready, and the resident memory (VmRSS) that setup added, at
its end and at its peak (VmHWM).  Variants: ``today`` (baseline), ``first`` (the cache is built), ``cached`` (a requeue:
the entry exists).  The tokenizer is the shipped tiny one; max_length 2048, as the alpaca recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "moe_train" / "assets" / "tiny_tokenizer"
MAX_LENGTH = 2048


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def generate(n: int, out: Path) -> tuple[str, str]:
    """``n`` alpaca-shaped records as Parquet and JSONL; word counts log-normal as in alpaca."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = [json.loads(line) for line in open(ROOT / "moe_train" / "assets" / "alpaca_sample.jsonl")]
    words = np.array(" ".join(r["instruction"] + " " + r["output"] for r in sample).split())
    rng = np.random.default_rng(0)

    def text(median: float) -> list[str]:
        counts = np.clip(rng.lognormal(np.log(median), 0.7, size=n), 1, 600).astype(int)
        return [" ".join(words[rng.integers(0, len(words), size=c)]) for c in counts]

    instruction, output = text(12), text(40)
    extra = [t if rng.random() < 0.4 else "" for t in text(8)]
    table = pa.table(
        {
            "instruction": instruction,
            "input": extra,
            "output": output,
            "text": [f"### Instruction:\n{i}\n\n### Response:\n{o}" for i, o in zip(instruction, output)],
        }
    )
    parquet, jsonl = out / "alpaca.parquet", out / "alpaca.jsonl"
    pq.write_table(table, parquet)
    with open(jsonl, "w") as f:
        for row in table.drop(["text"]).to_pylist():
            f.write(json.dumps(row) + "\n")
    return str(parquet), str(jsonl)


def worker(variant: str, data: str, cache_dir: str, out: str) -> None:
    """One rank: the data part of the trainer's start-up, timed and measured."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from moe_train.data import PackedLoader, build_packed_dataset
    from moe_train.engine.resume import data_fingerprint

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rss0 = _status("VmRSS")  # after the imports: what follows is the data's
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER), trust_remote_code=False)
    if variant == "today":
        packs, _ = build_packed_dataset([data], tokenizer, "deepseek_v2", MAX_LENGTH)
        loader = PackedLoader(packs, dp_rank=rank, dp_size=2)
        fingerprint = data_fingerprint([data], loader.packs)
    else:
        packs, _ = build_packed_dataset(data, tokenizer, "deepseek_v2", MAX_LENGTH, cache_dir=cache_dir)
        loader = PackedLoader(packs, dp_rank=rank, dp_size=2)
        fingerprint = data_fingerprint(loader.packs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    dist.barrier()
    result = {
        "seconds": seconds,
        "cpu_s": cpu,
        "rss_mb": (_status("VmRSS") - rss0) / 2**20,
        "peak_mb": (_status("VmHWM") - rss0) / 2**20,
        "packs": fingerprint["packs"],
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def run(variant: str, data: str, cache_dir: str, pythonpath: str, tmp: Path) -> list[dict]:
    from tests.launch import free_port

    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = str(tmp / variant)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", variant, data, cache_dir, out],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit(f"{variant}: a rank failed")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--baseline-ref", default="main", help="git ref whose moe_train is today's reader")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-") as d:
        tmp = Path(d)
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline_ref], capture_output=True, text=True
        ).stdout.strip()
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline_ref, "moe_train"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        parquet, jsonl = generate(args.samples, tmp)
        ours = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        results = {
            f"today ({commit}, JSONL)": run("today", jsonl, "", f"{baseline}{os.pathsep}{ROOT}", tmp),
            "cache: first run (Parquet)": run("first", parquet, str(tmp / "cache"), ours, tmp),
            "cache: cached rerun": run("cached", parquet, str(tmp / "cache"), ours, tmp),
        }
    print(f"{args.samples} alpaca-shaped samples, max_length {MAX_LENGTH}, 2 ranks (gloo)")
    print("| variant | start-up s (slower rank) | CPU s r0 / r1 | RSS added MiB r0 / r1 | peak MiB r0 / r1 | packs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (a, b) in results.items():
        print(
            f"| {name} | {max(a['seconds'], b['seconds']):.2f} | {a['cpu_s']:.1f} / {b['cpu_s']:.1f} | "
            f"{a['rss_mb']:.1f} / {b['rss_mb']:.1f} | {a['peak_mb']:.1f} / {b['peak_mb']:.1f} | {a['packs']} |"
        )


if __name__ == "__main__":
    main()
