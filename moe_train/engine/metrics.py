"""Throughput (TGS), model FLOPs utilisation (MFU), expert load and memory for each step, and the
run's metrics files (one per run segment; see `MetricsWriter` and `read_metrics`).

FLOPs of one training step (forward + backward = 3 x forward), the family's ``ModelSpec.train_flops``:
    6 * N_active * tokens                                    (every matmul weight a token touches)
  + 3 * flops_per_key * sum_i s_i^2 / 2                      (causal attention scores and values over
                                                              each packed sample i of s_i tokens)
N_active counts attention, dense MLP, shared experts, the top-k routed experts, the router and the
LM head, on the model built on the meta device (``moe_train.models.param_counts``); the embedding
lookup and the norms are not matmuls and are left out.  ``flops_per_key`` is 2 * layers * heads *
(q/k head dim + v head dim) of the family's ``AttentionShape``.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import resource
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from moe_train.models import param_counts, spec_of
from moe_train.run_dir import RunDir
from moe_train.storage import is_local, redact_all

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0}


def active_matmul_params(cfg: Any) -> int:
    return param_counts(cfg).active_matmul


def step_flops(cfg: Any, sample_lengths: list[int]) -> float:
    return spec_of(cfg).train_flops(cfg, sample_lengths)


def peak_tflops(override: float | None) -> float | None:
    """Peak dense TFLOP/s of this device: the override, the table, or None (unknown, e.g. CPU)."""
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def expert_load_stats(load_LE: torch.Tensor) -> list[dict[str, float]]:
    """Per MoE layer: min, max and mean tokens per expert and their coefficient of variation
    (``max / mean`` near ``n_routed_experts / top_k`` is a collapsed router)."""
    load = load_LE.float()
    mean = load.mean(dim=1).clamp(min=1e-9)
    cv = load.std(dim=1, unbiased=False) / mean
    return [
        {"min": int(a), "max": int(b), "mean": round(float(m), 2), "cv": round(float(c), 4)}
        for a, b, m, c in zip(load.min(dim=1).values, load.max(dim=1).values, mean, cv, strict=True)
    ]


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# --- the metrics of a run: one JSON-lines file per run segment -------------------------------------

# run.metrics/segment-0001.jsonl, segment-0002.jsonl, ... one per start or resume; run.legacy_metrics: the
# single file of runs before segments, read as segment 0
FLUSH_S = 2.0  # object stores: the spool is uploaded at most this long after a record
STALL_S = 30.0  # an upload slower than this is logged


def segment_paths(run: RunDir) -> list[str]:
    """The run's metrics files in the order they were written (missing directory: none)."""
    try:
        names = run.fs.ls(run.metrics, detail=False)
    except FileNotFoundError:
        names = []
    segments = sorted(n for n in names if re.fullmatch(r"segment-\d+\.jsonl", posixpath.basename(n)))
    return ([run.legacy_metrics] if run.fs.exists(run.legacy_metrics) else []) + segments


def _parse(text: str, shown: str) -> list[dict[str, Any]]:
    """The records of one metrics file; a line that is no JSON record is skipped with a warning naming it
    (silently when it is the last: a live or killed run's half-written line)."""
    records, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i < len(lines) - 1 and line.strip():
            print(f"Warning: {shown}:{i + 1} is not a JSON record; skipped", file=sys.stderr)
    return records


def _generation(seg: list[dict[str, Any]]) -> int:
    """The lease generation in a segment's header (0: written before fencing, or no header)."""
    g = seg[0].get("generation", 0) if seg and seg[0].get("event") == "segment" else 0
    return g if type(g) is int else 0


def read_metrics(run: RunDir, segments: bool = False) -> list[dict[str, Any]]:
    """The run's records across segments, each step once: a segment that resumed from step N replaces
    every record after N of the segments before it (a crash's repeated steps, an abandoned branch).
    Segments count in the order of their lease generation, then of their number, so the records a stale
    holder appends to its segment after a takeover are replaced too.
    ``segments=True`` keeps each segment's header record (``"event": "segment"``)."""
    parsed = []
    for path in segment_paths(run):
        try:
            parsed.append(_parse(run.fs.cat_file(path).decode(errors="replace"), run.display(path)))
        except FileNotFoundError:  # removed between listing and reading
            continue
    records: list[dict[str, Any]] = []
    for seg in sorted(parsed, key=_generation):  # stable: segments of one generation keep their order
        if seg and seg[0].get("event") == "segment":
            start = seg[0].get("resumed_from", 0)
            records = [r for r in records if r.get("step", 0) <= start]
            if not segments:
                seg = seg[1:]
        records += seg
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's figures over the whole run (all segments)."""
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    heads = [r for r in records if r.get("event") == "segment"]
    out: dict[str, Any] = {
        "steps": steps[-1]["step"] if steps else 0,
        "losses": [r["loss"] for r in steps],
        "tgs": [r["tgs"] for r in steps],
        "val_losses": [{"step": r["step"], "val_loss": r["val_loss"]} for r in evals],
        "segments": len(heads),
        "elapsed": steps[-1].get("elapsed") if steps else None,
        "tokens": sum(r["tokens"] for r in steps),
    }
    if steps:
        out["mean_tgs"] = round(sum(out["tgs"]) / len(steps), 2)
    return out


class _Mirror:
    """Copies local files to an object store from a background thread, each at most ``interval``
    seconds after it changed (the whole file: appending by rewrite, fine at metrics sizes).

    fsspec buffers writes to object stores until close, so a record written there directly would
    be visible only at the end of the run, and lost with it on SIGKILL.  Failed uploads are retried
    with backoff; an upload that has not finished after ``stall_s`` is logged once."""

    def __init__(
        self, run: RunDir, pairs: Any, interval: float = FLUSH_S, stall_s: float = STALL_S, log: Any = print
    ) -> None:
        self.run, self.pairs, self.interval, self.stall_s, self.log = run, pairs, interval, stall_s, log
        self._seen: dict[str, tuple[int, int]] = {}
        self._busy: tuple[str, float] | None = None
        self._warned = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-mirror", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync()

    def sync(self) -> None:
        with self._lock:
            for local, remote in self.pairs():
                st = os.stat(local)
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(local) == key:
                    continue
                with open(local, "rb") as f:
                    data = f.read()
                self._put(remote, data)
                self._seen[local] = key

    def _put(self, remote: str, data: bytes, attempts: int = 5) -> None:
        for attempt in range(1, attempts + 1):
            self._busy = (remote, time.monotonic())
            try:
                self.run.put_bytes(remote, data)
                return
            except Exception as e:  # noqa: BLE001 - any store error: retry, then keep training
                wait = min(2.0**attempt, 30.0)
                self.log(
                    f"metrics upload to {self.run.display(remote)} failed ({type(e).__name__}: {e}); "
                    + (
                        f"retry {attempt}/{attempts - 1} in {wait:.0f}s"
                        if attempt < attempts
                        else "giving up until the next record"
                    )
                )
                if attempt < attempts and not self._stop.wait(wait):
                    continue
                return
            finally:
                self._busy = None

    def check_stall(self) -> None:
        busy = self._busy
        if busy and not self._warned and time.monotonic() - busy[1] > self.stall_s:
            self._warned = True
            self.log(
                f"metrics upload to {self.run.display(busy[0])} has not finished after {self.stall_s:.0f}s; "
                "the object store may be stalled (training goes on, the upload retries)"
            )

    def close(self, timeout: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        done = threading.Thread(target=self.sync, daemon=True)
        done.start()
        done.join(timeout)
        if done.is_alive():
            self.log(
                f"the last metrics upload did not finish within {timeout:.0f}s; the work dir's metrics may "
                "miss the final records"
            )


class MetricsWriter:
    """The records of this run segment in ``run.metrics/segment-NNNN.jsonl``, and TensorBoard event
    files in ``run.tb`` when TensorBoard is installed.

    The segment's first line says where it starts (``resumed_from``: 0 for a fresh start), so that
    ``read_metrics`` keeps each step once.  Every record gets ``time`` (Unix seconds) and
    ``elapsed`` (seconds of training behind it, across segments: the resume point's elapsed plus
    this segment's).  Local work dirs are appended and flushed per record; on object stores the
    records go to a local spool that `_Mirror` uploads within ``FLUSH_S`` seconds (TensorBoard too).
    """

    def __init__(
        self,
        run: RunDir,
        resumed_from: int = 0,
        tensorboard: bool = True,
        log: Any = print,
        flush_s: float = FLUSH_S,
        header: dict[str, Any] | None = None,
        stall_s: float = STALL_S,
    ) -> None:
        previous = read_metrics(run)
        kept = [r for r in previous if r.get("step", 0) <= resumed_from and "elapsed" in r]
        self._base = kept[-1]["elapsed"] if kept else 0.0
        self._t0 = time.monotonic()
        number = 1 + max(
            [
                int(re.findall(r"\d+", posixpath.basename(p))[0])
                for p in segment_paths(run)
                if p.endswith(".jsonl") and "segment-" in p
            ]
            or [0]
        )
        self._run = run
        self.path = posixpath.join(run.metrics, f"segment-{number:04d}.jsonl")
        self.segment = number
        self.trackers: Any = None  # engine/tracking.py's Trackers (--report-to mlflow,wandb): every record, too
        self._closed = False
        self._mirror = None
        tb_dir = run.tb
        if is_local(run.fs):
            run.makedirs(run.metrics)
            self._f = run.open(self.path, "a")
        else:
            self._spool = tempfile.mkdtemp(prefix="moe-train-metrics-")
            self._f = open(os.path.join(self._spool, posixpath.basename(self.path)), "a")  # noqa: SIM115
            remote_tb, tb_dir = tb_dir, os.path.join(self._spool, "tb")

            def pairs() -> list[tuple[str, str]]:
                out = [(self._f.name, self.path)]
                for dirpath, _, files in os.walk(tb_dir):
                    for name in files:
                        local = os.path.join(dirpath, name)
                        out.append((local, posixpath.join(remote_tb, os.path.relpath(local, tb_dir))))
                return out

            self._mirror = _Mirror(run, pairs, interval=flush_s, stall_s=stall_s, log=log)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(tb_dir, flush_secs=int(max(1, flush_s)))
        head = {"event": "segment", "segment": number, "resumed_from": resumed_from, "generation": run.generation}
        self.write({**head, **(header or {})})

    def write(self, record: dict[str, Any]) -> None:
        self._run.check_owner(sync=False)  # the heartbeat's verdict: no store round-trip per record
        # standard JSON: a non-finite figure (a diverged step) is written as null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        record = {
            **record,
            "time": round(time.time(), 3),
            "elapsed": round(self._base + time.monotonic() - self._t0, 3),
        }
        self._f.write(json.dumps(redact_all(record), allow_nan=False) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self._tb.add_scalar(k if "event" not in record else f"{record['event']}/{k}", v, record["step"])
        if self._mirror is not None:
            self._mirror.check_stall()
        if self.trackers is not None:
            self.trackers.log(record)  # queued: never waits on a tracker

    def close(self, status: str = "FINISHED") -> None:
        """End the segment (once); ``status`` (FINISHED, FAILED, KILLED: stopped to resume) goes to the trackers."""
        if self._closed:
            return
        self._closed = True
        if self._tb is not None:
            self._tb.close()
        self._f.close()
        if self._mirror is not None:
            self._mirror.close()
        if self.trackers is not None:
            self.trackers.close(status)
