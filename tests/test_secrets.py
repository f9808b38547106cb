"""Secrets never stored or shown: the TorchX credential filter, redaction, and a real run whose data URL
carries a password (served over HTTP on loopback), scanned afterwards in every file and every output."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from moe_train.storage import redact, redact_all
from tests.launch import check, cpu_env, torchrun
from tests.test_launch import appdef

PASSWORD = "pa/ss-7c1e9f"  # '/' in it, as in real secrets
TOKEN = "ghp-token-4d2b8a"
URL_PASSWORD = "pa%2Fss-7c1e9f"  # the same, as a fetchable URL carries it


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"http://user:{PASSWORD}@host/x.jsonl", "http://***@host/x.jsonl"),
        (f"https://{TOKEN}@host/x", "https://***@host/x"),
        (
            f"resumed from s3://k:{PASSWORD}@bucket/run/step-1 at step 1",
            "resumed from s3://***@bucket/run/step-1 at step 1",
        ),
        ("https://h/x?X-Amz-Signature=abc&a=1", "https://h/x?X-Amz-Signature=***&a=1"),
        ("s3://bucket/a@b/c", "s3://bucket/a@b/c"),  # an '@' in a path is no user-info
    ],
)
def test_redact_finds_user_info_anywhere_in_a_text(text, shown):
    assert redact(text) == shown
    assert redact_all({"data": [text], "n": 3}) == {"data": [shown], "n": 3}


@pytest.mark.parametrize(
    "args",
    [
        ["--env", "AZURE_STORAGE_ACCOUNT_KEY=x"],
        ["--env", "MY_SERVICE_KEY=x"],
        ["--env", f"HTTPS_PROXY=http://u:{PASSWORD}@proxy:3128"],
        ["--env", f"PIP_INDEX_URL=https://{TOKEN}@pypi.example/simple"],
        ["--data", f"https://{TOKEN}@host/data.jsonl"],
        ["--data", f"https://user:{PASSWORD}@host/data.jsonl"],
        ["--resume", f"s3://key:{PASSWORD}@bucket/run/checkpoints/step-00000010"],
        ["--", f"--data=https://u:{PASSWORD}@host/x.jsonl"],
    ],
)
def test_the_torchx_filter_refuses_credentials_without_echoing_them(args):
    with pytest.raises(ValueError, match="credentials must not go into --env or URLs") as e:
        appdef("deepseek_v2_full", *args)
    assert PASSWORD not in str(e.value) and TOKEN not in str(e.value)


def test_the_torchx_filter_lets_plain_values_through():
    appdef("deepseek_v2_full", "--data", "s3://bucket/a@b/data.jsonl", "--env", "HTTPS_PROXY=http://proxy:3128")


@pytest.fixture
def http_data(tmp_path):
    """The shipped sample data on a loopback HTTP server (which ignores the credentials it is sent)."""
    root = Path(__file__).resolve().parents[1] / "moe_train" / "assets"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://trainer:{URL_PASSWORD}@127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_credentials_are_absent_from_every_file_and_every_output(tmp_path, http_data):
    secret = "env-secret-3e8d1f0a"
    work = tmp_path / "work"
    hf_home = tmp_path / "hf"  # datasets' and huggingface_hub's own caches: searched too
    env = cpu_env(tmp_path, AWS_SECRET_ACCESS_KEY=secret, NO_PROXY="127.0.0.1", HF_HOME=str(hf_home))
    args = [
        "tiny",
        "--deepspeed",
        "deepspeed_zero3",
        "--work-dir",
        str(work),
        "--data",
        f"{http_data}/alpaca_sample.jsonl",
        "--max-steps",
        "2",
        "--save-steps",
        "2",
    ]
    runs = [check(torchrun(args, tmp_path, env=env))]
    # A bad URL with the same credentials: the error line names it redacted.
    runs.append(
        torchrun(
            ["tiny", "--work-dir", str(tmp_path / "w2"), "--data", f"{http_data}/missing.jsonl"], tmp_path, env=env
        )
    )
    assert runs[1].returncode != 0 and "Error: http://***@127.0.0.1:" in runs[1].stderr, runs[1].stderr[-2000:]
    files = [p for p in [*work.rglob("*"), *hf_home.rglob("*"), *(tmp_path / "w2").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and (work / "summary.json").exists()
    assert any(p.name == "packs.arrow" for p in files)  # the tokenized-data cache, in the work dir
    for p in files:
        data = p.read_bytes()
        for s in (URL_PASSWORD, "pa/ss-7c1e9f", secret):
            assert s.encode() not in data, f"{s} in {p}"
    for proc in runs:
        for s in (URL_PASSWORD, "pa/ss-7c1e9f", secret):
            assert s not in proc.stdout + proc.stderr
    # The saved recipe keeps the data URL, redacted (the search above would pass on an empty checkpoint too).
    assert any(b"http://***@127.0.0.1:" in p.read_bytes() for p in files if p.name == "state.json")
