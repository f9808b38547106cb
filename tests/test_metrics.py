"""The run's metrics: one file per run segment read back with each step once, live on object stores
(a real S3-protocol server), validation loss exact over ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from moe_train.engine.metrics import MetricsWriter, read_metrics, summarize
from moe_train.run_dir import RunDir
from tests.launch import check, cpu_env, metrics, torchrun, torchrun_cmd

ASSETS = Path(__file__).resolve().parents[1] / "moe_train" / "assets"


def _segment(fs, root, resumed_from, steps):
    w = MetricsWriter(RunDir(root, fs=fs), resumed_from=resumed_from, tensorboard=False)
    for s in steps:
        w.write({"step": s, "loss": float(s), "tgs": 1.0, "tokens": 10})
    w.close()
    return w.path


def test_segments_keep_each_step_once_and_elapsed_continues(tmp_path, capsys):
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    _segment(fs, root, 0, range(1, 9))  # crashed after step 8, last checkpoint at 5
    _segment(fs, root, 5, range(6, 13))  # resumed from 5 and ran to 12
    path = _segment(fs, root, 4, range(5, 7))  # rolled back to step 4, ran 2 steps
    assert path.endswith("metrics/segment-0003.jsonl")
    records = read_metrics(RunDir(root, fs=fs))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["time"] > 1.7e9 and r["elapsed"] >= 0 for r in records)
    assert [r["elapsed"] for r in records] == sorted(r["elapsed"] for r in records)
    run = summarize(read_metrics(RunDir(root, fs=fs), segments=True))
    assert run["segments"] == 3 and run["steps"] == 6 and run["losses"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # a half-written last line (a live or killed run) is skipped; a broken line before it too, with a warning
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')
    assert [r["step"] for r in read_metrics(RunDir(root, fs=fs))] == [1, 2, 3, 4, 5, 6]
    with open(path, "a") as f:
        f.write('\n{"step": 7}\n')
    assert [r["step"] for r in read_metrics(RunDir(root, fs=fs))] == [1, 2, 3, 4, 5, 6, 7]
    assert "is not a JSON record; skipped" in capsys.readouterr().err


def test_non_finite_figures_are_written_as_null(tmp_path):
    fs = fsspec.filesystem("file")
    w = MetricsWriter(RunDir(str(tmp_path), fs=fs), tensorboard=False)
    w.write({"step": 1, "loss": float("inf"), "grad_norm": float("nan")})
    w.close()
    text = Path(w.path).read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert read_metrics(RunDir(str(tmp_path), fs=fs))[0]["loss"] is None


def test_object_store_records_are_visible_within_seconds(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    root = f"{s3_server['bucket']}/live-{tmp_path.name}"
    w = MetricsWriter(RunDir(root, fs=fs), tensorboard=True, flush_s=0.5)
    w.write({"step": 1, "loss": 6.0, "tgs": 1.0, "tokens": 1})
    deadline, seen = time.monotonic() + 5, []
    while time.monotonic() < deadline and not seen:
        fs.invalidate_cache()
        seen = [r["step"] for r in read_metrics(RunDir(root, fs=fs))]
        time.sleep(0.2)
    assert seen == [1]  # before close: fsspec alone would buffer it until the end of the run
    w.close()
    fs.invalidate_cache()
    assert fs.ls(f"{root}/tb")  # TensorBoard event files uploaded next to the metrics


def _losses_by_step(records):
    return [r["step"] for r in records if "loss" in r]


@pytest.mark.slow
def test_s3_metrics_are_live_mid_run_and_survive_sigkill(s3_server, tmp_path):
    """torchrun on an s3:// work dir: records appear while it runs; after SIGKILL of the whole job the
    object holds every step up to a few seconds before the kill."""
    import s3fs

    url = f"s3://{s3_server['bucket']}/killed-{tmp_path.name}"
    env = cpu_env(tmp_path, FSSPEC_S3_ENDPOINT_URL=s3_server["endpoint"])
    cmd = torchrun_cmd(
        [
            "tiny",
            "--work-dir",
            url,
            "--epochs",
            "3",
            "--cfg-options",
            "max_steps=None",
            "--save-steps",
            "0",
            "--no-export",
        ]
    )
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    root = url.removeprefix("s3://")
    try:
        deadline, steps = time.monotonic() + 240, []
        while time.monotonic() < deadline and len(steps) < 10:
            assert p.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            fs.invalidate_cache()
            steps = _losses_by_step(read_metrics(RunDir(root, fs=fs)))
            time.sleep(0.5)
        assert len(steps) >= 10, "no live records"
        time.sleep(3)
        os.killpg(p.pid, signal.SIGKILL)
        killed_at = time.time()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
    fs.invalidate_cache()
    records = [r for r in read_metrics(RunDir(root, fs=fs)) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) > len(steps) and records[-1]["step"] < 132, "the run was not killed mid-run"
    assert killed_at - records[-1]["time"] < 5.0, (killed_at, records[-1])


@pytest.mark.slow
def test_validation_loss_is_exact_over_ranks(tmp_path):
    """2 ranks, eval data whose packs do not split evenly (dummy forwards on one rank), lr too small to
    move the weights: the logged val_loss equals the exported model's loss over all eval tokens."""
    from transformers import AutoTokenizer

    from moe_train.data import build_packed_dataset
    from moe_train.models.common.loss import causal_lm_loss
    from moe_train.models.deepseek_v2 import DeepseekV2ForCausalLM

    lines = (ASSETS / "alpaca_sample.jsonl").read_text().splitlines()
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(lines[:23]) + "\n")
    work = tmp_path / "w"
    proc = check(
        torchrun(
            [
                "tiny",
                "--work-dir",
                str(work),
                "--max-steps",
                "2",
                "--save-steps",
                "0",
                "--lr",
                "1e-30",
                "--eval-data",
                str(eval_file),
                "--eval-steps",
                "1",
            ],
            tmp_path,
        )
    )
    evals = [m for m in metrics(work) if m.get("event") == "eval"]
    assert [m["step"] for m in evals] == [1, 2]
    assert "val_loss" in proc.stdout

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer")
    packs, _ = build_packed_dataset([str(eval_file)], tokenizer, max_length=256)
    assert len(packs) % 2 == 1  # one rank runs a dummy forward
    model = DeepseekV2ForCausalLM.from_pretrained(str(work / "hf_model")).eval()
    ce, n = 0.0, 0
    with torch.no_grad():
        for pk in packs:
            out = model(pk.input_ids.long()[None], position_ids=pk.position_ids.long()[None], cu_seqlens=pk.cu_seqlens)
            ce += causal_lm_loss(out.logits, pk.labels.long()[None], reduction="sum").item()
            n += int((pk.labels[1:] != -100).sum())
    assert evals[-1]["val_tokens"] == n
    assert abs(evals[-1]["val_loss"] - ce / n) < 1e-5, (evals[-1], ce / n)

    # sequence parallel: each rank scores a slice of every eval row; the sum over ranks is the same
    check(
        torchrun(
            [
                "tiny",
                "--work-dir",
                str(tmp_path / "sp"),
                "--max-steps",
                "1",
                "--save-steps",
                "0",
                "--lr",
                "1e-30",
                "--sp",
                "2",
                "--no-export",
                "--eval-data",
                str(eval_file),
            ],
            tmp_path,
        )
    )
    (sp,) = [m for m in metrics(tmp_path / "sp") if m.get("event") == "eval"]
    assert sp["val_tokens"] == n and abs(sp["val_loss"] - ce / n) < 1e-5, (sp, ce / n)


class _FlakyStore(MemoryFileSystem):
    """An object store (not local to fsspec) whose uploads fail, then hang until released."""

    protocol = "flaky"
    root_marker = "/"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures, self.release = 0, threading.Event()

    def pipe_file(self, path, value, **kwargs):
        if self.failures:
            self.failures -= 1
            raise OSError("connection reset by peer")
        self.release.wait()
        return super().pipe_file(path, value, **kwargs)


def test_object_store_failures_are_retried_and_stalls_logged_without_blocking_training():
    fs = _FlakyStore(skip_instance_cache=True)
    fs.failures = 1
    lines: list[str] = []
    w = MetricsWriter(RunDir("/run", fs=fs), tensorboard=False, log=lines.append, flush_s=0.2, stall_s=0.5)
    t0 = time.monotonic()
    for step in range(1, 6):
        w.write({"step": step, "loss": 1.0})
        time.sleep(0.3)
    assert time.monotonic() - t0 < 3  # the writer never waits for the store
    assert any("failed (OSError: connection reset by peer); retry 1/4" in line for line in lines), lines
    assert any("has not finished after 0s" in line or "has not finished after 1s" in line for line in lines), lines
    assert not fs.exists("/run/metrics/segment-0001.jsonl")
    fs.release.set()
    w.close()
    assert [r["step"] for r in read_metrics(RunDir("/run", fs=fs))] == [1, 2, 3, 4, 5]


def test_stall_notice_names_the_operation():
    from moe_train.storage import stall_notice

    lines: list[str] = []
    with stall_notice("export to s3://b/run/hf_model", lines.append, after=0.1):
        time.sleep(0.3)
    assert lines[0].startswith("export to s3://b/run/hf_model still running after 0s; the storage may be stalled")
    assert lines[1].startswith("export to s3://b/run/hf_model took")


def test_s3_requests_have_timeouts_and_retries():
    from moe_train.storage import S3_CONFIG, resolve

    fs, _ = resolve("s3://bucket/run")
    assert fs.config_kwargs == S3_CONFIG and S3_CONFIG["retries"]["max_attempts"] > 1
    fs, _ = resolve("s3://bucket/run", {"config_kwargs": {"read_timeout": 5}})
    assert fs.config_kwargs == {"read_timeout": 5}  # the caller's choice wins
