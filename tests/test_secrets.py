"""Secrets never stored or shown: the TorchX credential filter, redaction, and a real run whose data URL
carries a password (served over HTTP on loopback), scanned afterwards in every file and every output."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
from torchx.specs.finder import get_component

from moe_train.storage import redact, redact_all
from tests.launch import check, cpu_env, torchrun
from tests.test_launch import CATALOGUE, appdef

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
        (
            "https://a.blob.core.windows.net/c/x?sv=1&sig=abc%2F&se=2",
            "https://a.blob.core.windows.net/c/x?sv=1&sig=***&se=2",
        ),
        # secret-like keys in JSON, Python and key=value values (an env value, a storage option)
        ('FSSPEC_S3={"key": "AKIA1", "secret": "s e"}', 'FSSPEC_S3={"key": "***", "secret": "***"}'),
        ("{'token': 'abc', 'anon': False}", "{'token': '***', 'anon': False}"),
        ("HF_TOKEN=hf_abc x AWS_SECRET_ACCESS_KEY: s3cr", "HF_TOKEN=*** x AWS_SECRET_ACCESS_KEY: ***"),
        # names that only contain such a word, and prose, are left alone
        ("tokenizer: /x (5 tokens) bos_token_id=1 monkey=3 FLOPs/token = 6", None),
    ],
)
def test_redact_finds_user_info_anywhere_in_a_text(text, shown):
    shown = text if shown is None else shown
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
        ["--data", f"https://b.s3.amazonaws.com/x.jsonl?X-Amz-Credential=AK&X-Amz-Signature={TOKEN}"],
        ["--data", f"https://storage.googleapis.com/b/x.jsonl?X-Goog-Signature={TOKEN}"],
        ["--resume", f"https://a.blob.core.windows.net/c/run/step-1?sv=2024&sig={TOKEN}"],
        ["--env", f'FSSPEC_S3={{"secret": "{PASSWORD}"}}'],  # torchx's --env takes no ',' and no second '='
        ["--", "--cfg-options", f"data=['s3://b/x?token={TOKEN}']"],
    ],
)
def test_the_torchx_filter_refuses_credentials_without_echoing_them(args):
    with pytest.raises(ValueError, match="credentials must not go into --env or URLs") as e:
        appdef("deepseek_v2_full", *args)
    assert PASSWORD not in str(e.value) and TOKEN not in str(e.value)


@pytest.mark.parametrize(
    "value",
    [f"token={TOKEN}", f"https://a.blob.core.windows.net/c/x.jsonl?sv=2024&sig={TOKEN}", f"{{'key': '{TOKEN}'}}"],
)
def test_the_python_api_refuses_credentials_inside_env_values(value):
    smoke = get_component(f"{CATALOGUE}:smoke").fn
    refused = r"^Error: moe-train-smoke: CONFIG_BLOB \(a .*\): credentials must not go into --env or URLs"
    with pytest.raises(ValueError, match=refused) as e:
        smoke(work_dir="/tmp/smoke", env={"CONFIG_BLOB": value})
    assert TOKEN not in str(e.value)


def test_the_torchx_filter_lets_plain_values_through():
    appdef("deepseek_v2_full", "--data", "s3://bucket/a@b/data.jsonl", "--env", "HTTPS_PROXY=http://proxy:3128")
    appdef("deepseek_v2_full", "--data", "https://host/x.jsonl?version=3", "--env", 'FSSPEC_S3={"anon": true}')


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
    secret, signature = "env-secret-3e8d1f0a", "sig-5a7c0e2b"
    work = tmp_path / "work"
    hf_home = tmp_path / "hf"  # datasets' and huggingface_hub's own caches: searched too
    fsspec_s3 = f'{{"key": "AKIA-{secret}", "secret": "{secret}"}}'  # read by fsspec, never used here
    env = cpu_env(
        tmp_path, AWS_SECRET_ACCESS_KEY=secret, FSSPEC_S3=fsspec_s3, NO_PROXY="127.0.0.1", HF_HOME=str(hf_home)
    )
    signed = f"?X-Amz-Credential={signature}&X-Amz-Signature={signature}&sig={signature}"
    args = [
        "tiny",
        "--deepspeed",
        "deepspeed_zero3",
        "--work-dir",
        str(work),
        "--data",
        f"{http_data}/alpaca_sample.jsonl",
        "--eval-data",  # user-info and a presigned URL's query (the loopback server ignores both)
        f"{http_data}/alpaca_sample.jsonl{signed}",
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
        for s in (URL_PASSWORD, "pa/ss-7c1e9f", secret, signature):
            assert s.encode() not in data, f"{s} in {p}"
    for proc in runs:
        for s in (URL_PASSWORD, "pa/ss-7c1e9f", secret, signature):
            assert s not in proc.stdout + proc.stderr, s
    # The saved recipe keeps the data URL, redacted (the search above would pass on an empty checkpoint too).
    states = [p.read_text() for p in files if p.name == "state.json"]
    assert states and all("http://***@127.0.0.1:" in t and "X-Amz-Signature=***" in t for t in states)
