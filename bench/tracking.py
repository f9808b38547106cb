"""Step time with a tracker that cannot answer, against none: ``--report-to`` must never slow a step.

``python -m bench.tracking [--steps 40] [--rounds 3]``

The tiny recipe trains ``--steps`` steps in one process, three ways, interleaved ``--rounds`` times:
``none`` (``--report-to tensorboard``, today's default), ``unreachable`` (``--report-to mlflow`` at a loopback
port where nothing listens: every call fails at once) and ``stalled`` (a socket that accepts connections
into its backlog and never answers: every call waits for MLflow's 10 s timeout, the worst case).  The
figure is the median of the per-step ``step_time`` of the metrics JSONL (steps after the first 3, which
warm up), per variant over all its rounds, and its ratio to ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import free_port, machine

ROOT = Path(__file__).resolve().parents[1]


def run(variant: str, steps: int, tmp: Path, uri: str) -> list[float]:
    work = tmp / f"{variant}-{len(list(tmp.iterdir()))}"
    report = "tensorboard" if variant == "none" else "mlflow"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": uri,
    }
    cmd = [sys.executable, "-m", "moe_train.cli", "train", "tiny", "--work-dir", str(work), "--max-steps", str(steps)]
    cmd += ["--save-steps", "0", "--no-export", "--report-to", report]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    records = [json.loads(line) for f in sorted((work / "metrics").glob("*.jsonl")) for line in f.open()]
    return [r["step_time"] for r in records if "step_time" in r and r["step"] > 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1024)  # never accepted
    uris = {
        "none": "",
        "unreachable": f"http://127.0.0.1:{free_port()}",
        "stalled": f"http://127.0.0.1:{stalled.getsockname()[1]}",
    }
    times: dict[str, list[float]] = {v: [] for v in uris}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as d:
        for _ in range(args.rounds):
            for variant, uri in uris.items():
                times[variant] += run(variant, args.steps, Path(d), uri)
    base = statistics.median(times["none"])
    print(f"{machine()}; tiny recipe, 1 process, {args.steps} steps x {args.rounds} rounds per variant")
    print("| tracker | median step_time ms | p90 ms | vs none |")
    print("| --- | --- | --- | --- |")
    for variant, ts in times.items():
        med, p90 = statistics.median(ts), statistics.quantiles(ts, n=10)[-1]
        print(f"| {variant} | {med * 1e3:.1f} | {p90 * 1e3:.1f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
