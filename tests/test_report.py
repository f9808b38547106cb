"""`moe-train report`: PNGs and report.md from a work dir's metrics, local and on a real S3-protocol server."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fsspec
import numpy as np
from click.testing import CliRunner

from moe_train.cli import main
from moe_train.engine.metrics import MetricsWriter
from moe_train.report import DPI, FIGSIZE, expert_load_matrix, load_run, report
from moe_train.run_dir import RunDir

LAYERS, STEPS = 3, 12


def _fake_run(fs, root: str) -> None:
    """A run's files as the trainer writes them: two segments (a resume at step 6), evals, a recipe."""
    rng = np.random.default_rng(0)
    for resumed_from, steps in ((0, range(1, 9)), (6, range(7, STEPS + 1))):
        w = MetricsWriter(
            RunDir(root, fs=fs),
            resumed_from=resumed_from,
            tensorboard=False,
            header={"world_size": 2, "device": "cpu", "torch": "2.x", "deepspeed": "0.x"},
        )
        for s in steps:
            load = [{"min": 1, "max": int(10 + s * (i + 1)), "mean": 8.0, "cv": 0.5} for i in range(LAYERS)]
            w.write(
                {
                    "step": s,
                    "loss": 6 - 0.1 * s,
                    "lr": 1e-3 * s / STEPS,
                    "grad_norm": float(rng.uniform(1, 5)),
                    "tgs": 1000.0 + s,
                    "mfu": 0.1,
                    "tokens": 500,
                    "step_time": 0.5,
                    "expert_load": load,
                }
            )
            if s % 4 == 0:
                w.write({"step": s, "event": "eval", "val_loss": 6.1 - 0.1 * s, "val_tokens": 100})
        w.close()
    with fs.open(f"{root}/recipe.json", "w") as f:
        json.dump({"name": "tiny", "model_size": "tiny", "lr": 1e-3, "grad_accum": 1}, f)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_report_writes_readable_figures_and_leaves_the_work_dir_alone(tmp_path):
    work = tmp_path / "work"
    fs = fsspec.filesystem("file")
    _fake_run(fs, str(work))
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["report", str(work), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before  # read only
    out = tmp_path / "out"
    for name in ("loss", "lr", "grad_norm", "throughput", "expert_load"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 5000, name  # axes, a curve and labels, not an empty canvas
        assert _png_size(png) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)), name
    run = load_run(str(work))
    assert [r["step"] for r in run["steps"]] == list(range(1, STEPS + 1))  # the resumed steps once
    load = expert_load_matrix(run["steps"])
    assert load.shape == (LAYERS, STEPS)  # one heatmap row per MoE layer
    assert load[2, -1] == (10 + STEPS * 3) / 8.0
    md = (out / "report.md").read_text()
    assert "# Run report: tiny" in md and "2 ranks on cpu" in md and "![expert_load](expert_load.png)" in md
    assert "2 segment(s)" in md and "| validation loss | 4.9000 at step 12 |" in md


def test_report_reads_an_object_store_work_dir(s3_server, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    root = f"{s3_server['bucket']}/report-{tmp_path.name}"
    _fake_run(fs, root)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server["endpoint"]})  # FSSPEC_S3_ENDPOINT_URL
    paths = report(f"s3://{root}", str(tmp_path / "out"))
    assert Path(paths["expert_load"]).stat().st_size > 5000
    assert f"s3://{root}" in Path(paths["report"]).read_text()


def test_report_of_an_empty_work_dir_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "no metrics yet" in result.output
    assert len(result.output.strip().splitlines()) == 1
