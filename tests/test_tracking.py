"""--report-to mlflow,wandb: a real MLflow tracking server on loopback, W&B in offline mode, and trackers that
are unreachable or stalled while training goes on."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.launch import check, cpu_env, free_port, metrics, moe_train

pytestmark = pytest.mark.slow

SECRET = "pw-planted-0123456789"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port with a SQLite store, once per test session."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() - t0 < 300, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    print(f"MLflow server up in {time.monotonic() - t0:.1f}s at {uri}")
    yield uri
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def secret_data(tmp_path_factory):
    """The shipped alpaca sample behind HTTP basic auth: --data carries the password in the URL."""
    import base64
    import http.server

    sample = (Path(__file__).resolve().parents[1] / "moe_train" / "assets" / "alpaca_sample.jsonl").read_bytes()
    expected = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(sample)))
            self.end_headers()
            self.wfile.write(sample)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://user:{SECRET}@127.0.0.1:{server.server_address[1]}/alpaca.jsonl"
    server.shutdown()


def files_mentioning(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()]


def steps_and_losses(work: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(work) if "loss" in m}


def test_mlflow_gets_the_run_and_a_resume_continues_it(mlflow_server, secret_data, tmp_path):
    from mlflow import MlflowClient

    work = tmp_path / "work"
    env = cpu_env(tmp_path, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_EXPERIMENT_NAME=f"exp-{tmp_path.name}")
    base = ["train", "tiny", "--report-to", "mlflow", "--data", secret_data, "--work-dir", str(work)]
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "moe_train.cli", *base, *a], env=env, capture_output=True, text=True, timeout=300
    )
    check(run("--max-steps", "3", "--save-steps", "2", "--no-export"))
    check(run("--max-steps", "5", "--resume", "auto", "--no-export"))

    ids = json.loads((work / "tracking.json").read_text())
    client = MlflowClient(mlflow_server)
    mlrun = client.get_run(ids["mlflow"]["run_id"])
    assert mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    ours = steps_and_losses(work)
    # segment 1 logged steps 1-3, segment 2 resumed from the step-3 checkpoint and logged 4-5
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert {m.step: m.value for m in history} == pytest.approx(ours, abs=1e-9)
    assert mlrun.data.tags["moe_train.segment.1"] == "resumed_from=0 world_size=1"
    assert mlrun.data.tags["moe_train.segment.2"] == "resumed_from=3 world_size=1"
    assert {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "segment")} == {
        1: 1,
        2: 1,
        3: 1,
        4: 2,
        5: 2,
    }
    assert mlrun.data.params["lr"] == "0.003" and mlrun.data.params["model_size"] == "tiny"
    everything = json.dumps([mlrun.data.params, mlrun.data.tags]) + json.dumps([m.to_dictionary() for m in history])
    assert SECRET not in everything and "***" in mlrun.data.params["data"]
    assert files_mentioning(work, SECRET) == []


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (LevelDB's log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_writes_its_run_with_the_same_metrics(secret_data, tmp_path):
    pytest.importorskip("wandb")
    work = tmp_path / "work"
    env = cpu_env(tmp_path, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "elsewhere"))
    p = subprocess.run(
        [sys.executable, "-m", "moe_train.cli", "train", "tiny", "--report-to", "wandb,tensorboard", "--data",
         secret_data, "--work-dir", str(work), "--max-steps", "3", "--save-steps", "0", "--no-export"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    check(p)
    (log,) = (work / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    history = {}
    for r in wandb_records(log):
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history[items["step"]] = items
    ours = steps_and_losses(work)
    assert sorted(history) == sorted(ours) == [1, 2, 3]
    assert {s: h["loss"] for s, h in history.items()} == pytest.approx(ours, abs=1e-9)
    assert all(h["segment"] == 1 for h in history.values())
    assert list((work / "tb").iterdir()), "tensorboard was asked for too"
    assert files_mentioning(work, SECRET) == [] and files_mentioning(tmp_path / "elsewhere", SECRET) == []
    assert SECRET not in p.stdout + p.stderr


def test_a_stalled_tracker_never_slows_the_step(tmp_path, monkeypatch):
    """A tracking server that accepts connections and never answers (the worst case: no error, only waiting).
    Queueing a record stays well under a millisecond while the tracker's thread is stuck; the run's end waits
    a bounded time and says what was not delivered."""
    pytest.importorskip("mlflow")
    from moe_train.engine.tracking import Trackers

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(64)  # never accepted: requests wait for their timeout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{stalled.getsockname()[1]}")
    said: list[str] = []
    t = Trackers(["mlflow"], {}, {"segment": 1, "resumed_from": 0, "world_size": 1, "run_name": "x"}, {},
                 lambda ids: None, str(tmp_path), log=said.append)  # fmt: skip
    worst = 0.0
    for step in range(1, 501):
        t0 = time.perf_counter()
        t.log({"step": step, "loss": 1.0, "lr": 0.1})
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.002)
    # a call that waited on the tracker would take its 10 s timeout; 0.1 s leaves room for a loaded machine
    assert worst < 0.1, worst
    t0 = time.monotonic()
    t.close(timeout=3)
    assert time.monotonic() - t0 < 10
    assert any(re.fullmatch(r"500 metrics records did not reach mlflow .*", s) for s in said), said
    stalled.close()


def test_an_unreachable_tracker_is_a_warning_and_the_run_finishes(tmp_path):
    pytest.importorskip("mlflow")
    closed = free_port()  # nothing listens there
    work = tmp_path / "work"
    p = subprocess.run(
        [sys.executable, "-m", "moe_train.cli", "train", "tiny", "--report-to", "mlflow", "--work-dir", str(work),
         "--max-steps", "4", "--save-steps", "0", "--no-export"],
        env=cpu_env(tmp_path, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed}"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    check(p)
    out = p.stdout + p.stderr
    assert len(re.findall(r"mlflow is not reachable \(", out)) == 1, out[-3000:]
    assert re.search(r"\d+ metrics records did not reach mlflow", out), out[-3000:]
    assert sorted(steps_and_losses(work)) == [1, 2, 3, 4]


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    env = cpu_env(tmp_path, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    p = subprocess.run(
        [sys.executable, "-m", "moe_train.cli", "train", "tiny", "--report-to", "wandb", "--work-dir",
         str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == (
        "Error: --report-to wandb needs the wandb package: pip install 'moe-train[wandb]'"
    ), p.stderr[-2000:]
    assert not (tmp_path / "w").exists()
    p = moe_train(["train", "tiny", "--report-to", "neptune", "--work-dir", str(tmp_path / "w")], tmp_path)
    assert "'neptune': use any of tensorboard, mlflow, wandb, comma separated" in p.stderr.strip().splitlines()[-1]
