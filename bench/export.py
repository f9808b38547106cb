"""P4: streamed HF export to ``file://`` and ``s3://`` against writing the same bytes raw with fsspec.

The export is the trainer's (``moe_train.checkpoint.hf_layout.save_pretrained``: header first, then one tensor
at a time into size-bounded safetensors shards).  The raw baseline writes the files that export
produced, each in one ``write`` through the same fsspec filesystem: the speed the storage allows.
The S3 side talks to a moto server on loopback.  The server runs as a child process so the
objects it stores do not count in the writer's resident memory.

Figures: ``p4_write_fraction`` = raw time / export time (the slower of the two stores), and
``p4_peak_rss_ratio`` = the writer's peak RSS growth during export over the largest safetensors
file (the larger of the two stores).
"""

from __future__ import annotations

import json
import os
import posixpath
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import Result, moto_s3, table
from moe_train.checkpoint.hf_layout import save_pretrained
from moe_train.engine.memory import PeakRSS
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM
from moe_train.storage import resolve

MODES = {
    # repeats: (file, s3); page-cache writes take ~0.1 s and jitter a lot on a shared machine
    "test": dict(hidden=64, experts=8, ffn=32, layers=2, shard="64KB", repeats=(1, 1)),
    "quick": dict(hidden=512, experts=16, ffn=512, layers=5, shard="200MB", repeats=(21, 2)),
    "full": dict(hidden=1024, experts=16, ffn=704, layers=4, shard="400MB", repeats=(31, 3)),
}


def export_model(mode: str) -> DeepseekV2ForCausalLM:
    m = MODES[mode]
    cfg = DeepseekV2Config.from_name(
        "tiny",
        hidden_size=m["hidden"],
        intermediate_size=2 * m["hidden"],
        moe_intermediate_size=m["ffn"],
        n_routed_experts=m["experts"],
        num_experts_per_tok=2,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        num_hidden_layers=m["layers"],
    )
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(cfg, ExpertLayout("shard", m["experts"] // 4))


def measure_store(model, url: str, storage_options: dict | None, shard: str, repeats: int) -> dict:
    """Median export and raw-write seconds, peak RSS growth of export, bytes and largest file.

    The peak RSS is that of the first full-size export in this process: later ones reuse heap
    that the first one grew, so their RSS growth understates what a fresh writer needs.  Timed
    rounds then alternate which side goes first and start with dirty pages flushed, so neither
    side pays for the other's writeback.  Every round writes into new directories.
    """
    fs, root = resolve(url, storage_options)
    small = export_model("test")  # warms up imports and connections without growing the heap much
    save_pretrained(small, posixpath.join(url, "warmup"), max_shard_size="64KB", storage_options=storage_options)
    fs.rm(posixpath.join(root, "warmup"), recursive=True)
    with PeakRSS(interval=0.001) as rss:
        save_pretrained(model, posixpath.join(url, "first"), max_shard_size=shard, storage_options=storage_options)
    first = posixpath.join(root, "first")
    files = {posixpath.basename(p): fs.cat_file(p) for p in sorted(fs.ls(first, detail=False))}
    fs.rm(first, recursive=True)

    def export(target: str) -> None:
        save_pretrained(model, posixpath.join(url, target), max_shard_size=shard, storage_options=storage_options)

    def raw(target: str) -> None:
        fs.makedirs(posixpath.join(root, target), exist_ok=True)
        for name, data in files.items():
            with fs.open(posixpath.join(root, target, name), "wb") as f:
                f.write(data)

    # A local write is CPU work in this process (the copy into the page cache), so its CPU time
    # is the steady measure on a shared machine; an S3 write waits on the server: wall time.
    clock = time.process_time if url.startswith("file://") else time.perf_counter
    times: dict[str, list[float]] = {"export": [], "raw": []}
    for i in range(repeats):
        for name, fn in [("export", export), ("raw", raw)] if i % 2 == 0 else [("raw", raw), ("export", export)]:
            os.sync()
            t0 = clock()
            fn(f"{name}-{i}")
            times[name].append(clock() - t0)
            fs.rm(posixpath.join(root, f"{name}-{i}"), recursive=True)
    largest = max(len(d) for name, d in files.items() if name.endswith(".safetensors"))
    return {
        "export_s": statistics.median(times["export"]),
        "raw_s": statistics.median(times["raw"]),
        "peak_rss": rss.peak_delta,
        "bytes": sum(len(d) for d in files.values()),
        "files": len(files),
        "largest_file": largest,
    }


def measure(mode: str) -> dict[str, dict]:
    m = MODES[mode]
    model = export_model(mode)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        results["file"] = measure_store(model, f"file://{tmp}", None, m["shard"], m["repeats"][0])
    with moto_s3() as options:
        fs, _ = resolve("s3://bench-export", options)
        fs.mkdir("bench-export")
        results["s3"] = measure_store(model, "s3://bench-export", options, m["shard"], m["repeats"][1])
    return results


def run(mode: str = "quick") -> Result:
    """Measure in a fresh process: RSS growth means little in one whose heap earlier work already grew."""
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        out = os.path.join(tmp, "results.json")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.export",
                "--mode",
                mode,
                "--out",
                out,
                "--threads",
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"export benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            results = json.load(f)
    m = MODES[mode]
    rows = [
        [
            store,
            r["bytes"] / 2**20,
            r["files"],
            r["largest_file"] / 2**20,
            r["export_s"],
            r["raw_s"],
            r["raw_s"] / r["export_s"],
            r["peak_rss"] / 2**20,
            r["peak_rss"] / r["largest_file"],
        ]
        for store, r in results.items()
    ]
    figures = {
        "p4_write_fraction": min(r["raw_s"] / r["export_s"] for r in results.values()),
        "p4_peak_rss_ratio": max(r["peak_rss"] / r["largest_file"] for r in results.values()),
    }
    notes = (
        f"model: tiny DeepSeek V2 at hidden {m['hidden']}, {m['experts']} experts of {m['ffn']}, "
        f"{m['layers']} layers, fp32; max_shard_size {m['shard']}; median of {m['repeats'][0]} (file) and "
        f"{m['repeats'][1]} (s3) runs (file: CPU time, s3: wall time); peak RSS of the first export in a "
        "fresh process."
    )
    headers = [
        "store",
        "MiB",
        "files",
        "largest file MiB",
        "export s",
        "raw write s",
        "raw / export",
        "export peak RSS MiB",
        "peak RSS / largest file",
    ]
    targets = {"p4_write_fraction": (">=", 0.8), "p4_peak_rss_ratio": ("<=", 2)}
    return Result("P4 streamed HF export", figures, table(headers, rows), notes, targets)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="P4 measurements in this process (run() starts this)")
    parser.add_argument("--mode", choices=list(MODES), default="quick", help="problem size")
    parser.add_argument("--out", required=True, help="where to write the measurements (JSON)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.out, "w") as f:
        json.dump(measure(args.mode), f)
