"""The tokenized-data cache across real processes (gloo): one rank tokenizes, the others wait and
memory-map; node-local caches each get their own builder; a failing or killed builder stops the others
with one line; a requeue reuses the entry; a changed input gets a new one."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from importlib import resources
from pathlib import Path

import pytest

from tests.launch import free_port

ASSETS = resources.files("moe_train") / "assets"
SAMPLE = str(ASSETS / "alpaca_sample.jsonl")

pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, root: str, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from moe_train.data import build_packed_dataset, cache

    dist.init_process_group("gloo", rank=rank, world_size=2)
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))

    def run(name: str, data: str, cache_dir: str) -> None:
        logs: list[str] = []
        try:
            packs, _ = build_packed_dataset(data, tokenizer, max_length=256, cache_dir=cache_dir, log=logs.append)
            result = {"built": any("tokenized" in m for m in logs), "sha": packs.sha256(), "entry": packs.entry}
        except ValueError as e:
            result = {"error": str(e)}
        out.put((name, rank, result))

    shared = os.path.join(root, "shared")
    run("first", SAMPLE, shared)
    run("requeue", SAMPLE, shared)
    run("node-local", SAMPLE, os.path.join(root, f"node{rank}"))  # each rank sees only its own directory
    bad = os.path.join(root, "bad.jsonl")
    run("bad-data", bad, shared)
    # The builder (rank 0) is killed while it tokenizes: rank 1 must not wait forever.
    cache.STALE_S = 3.0
    if rank == 0:
        cache.write_packs = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    run("killed", os.path.join(root, "other.jsonl"), shared)


def test_one_builder_per_storage_and_failures_reach_every_rank(tmp_path, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output" "b"}\n')
    (tmp_path / "other.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    results: dict[str, dict[int, dict]] = {}
    for _ in range(9):  # five rounds on two ranks, less rank 0's killed one
        name, rank, result = out.get(timeout=600)
        results.setdefault(name, {})[rank] = result
    for p in procs:
        p.join(timeout=60)
    assert procs[0].exitcode == -signal.SIGKILL and procs[1].exitcode == 0

    first = results["first"]
    assert [first[r]["built"] for r in (0, 1)] == [True, False]  # rank 0 tokenized, rank 1 mapped its file
    assert first[0]["sha"] == first[1]["sha"] and first[0]["entry"] == first[1]["entry"]
    assert not any(r["built"] for r in results["requeue"].values())
    assert results["requeue"][1]["sha"] == first[0]["sha"]
    local = results["node-local"]
    assert [local[r]["built"] for r in (0, 1)] == [True, True] and local[0]["sha"] == local[1]["sha"]
    bad = results["bad-data"]
    assert bad[0]["error"] == bad[1]["error"] and "bad.jsonl:2: invalid JSON" in bad[1]["error"]
    assert "has not moved for 3s; it may have died" in results["killed"][1]["error"]
    shared = tmp_path / "shared"
    entries = [p for p in shared.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "COMPLETE").exists()  # the bad and killed builds left no entry
    assert not [p for p in shared.iterdir() if p.name.startswith(".probe")]
    # The killed builder's partial entry is there until the next build of that data sweeps it.
    assert len([p for p in shared.iterdir() if ".tmp-" in p.name]) == 1
    from transformers import AutoTokenizer

    from moe_train.data import build_packed_dataset, cache

    monkeypatch.setattr(cache, "STALE_S", 0.0)
    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))
    build_packed_dataset(str(tmp_path / "other.jsonl"), tokenizer, max_length=256, cache_dir=str(shared))
    left = sorted(p.name.split("-")[0].split(".")[-1] for p in shared.iterdir() if p.name.startswith("."))
    assert left == ["failed"]  # the bad data's one line, for ranks that were waiting on it
    assert len([p for p in shared.iterdir() if not p.name.startswith(".")]) == 2


def test_a_changed_file_gets_a_new_entry_and_the_fingerprint_sees_the_content(tmp_path):
    from transformers import AutoTokenizer

    from moe_train.data import build_packed_dataset
    from moe_train.engine.resume import data_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))
    data = tmp_path / "d.jsonl"
    lines = Path(SAMPLE).read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:100]))
    a, _ = build_packed_dataset(str(data), tokenizer, max_length=256, cache_dir=str(tmp_path / "c"))
    data.write_text("".join(lines[:100]))  # the same bytes again: a new stamp, a new entry, the same packs
    os.utime(data, (1, 1))
    b, _ = build_packed_dataset(str(data), tokenizer, max_length=256, cache_dir=str(tmp_path / "c"))
    assert a.entry != b.entry and data_fingerprint(a)["sha256"] == data_fingerprint(b)["sha256"]
    data.write_text("".join(lines[1:101]))  # other content
    c, _ = build_packed_dataset(str(data), tokenizer, max_length=256, cache_dir=str(tmp_path / "c"))
    assert data_fingerprint(c)["sha256"] != data_fingerprint(a)["sha256"]
    # what a resume checks against the checkpoint's record: the same packs pass, other content is refused
    from types import SimpleNamespace

    from moe_train.engine.resume import check_model_and_data
    from tests.conftest import tiny_config

    cfg = tiny_config()
    saved = SimpleNamespace(state={"config": cfg.to_hf_dict(), "data": json.loads(json.dumps(data_fingerprint(a)))})
    check_model_and_data(saved, cfg, data_fingerprint(b))
    with pytest.raises(ValueError, match=r"data differs from the checkpoint's \(\d+ -> \d+ packs; .*d.jsonl"):
        check_model_and_data(saved, cfg, data_fingerprint(c))
    held = c.select([2, 0])
    assert held[0].input_ids.tolist() == c[2].input_ids.tolist() and held.sha256() != c.sha256()
    # the entry carries the tokenizer files with the template trained with
    tok_dir = Path(c.tokenizer_dir)
    assert (tok_dir / "chat_template.jinja").read_text() == json.loads((tok_dir / "tokenizer_config.json").read_text())[
        "chat_template"
    ]


def test_where_the_cache_lives(tmp_path, monkeypatch):
    """In the work dir on a file system; on local disk for a work dir on an object store (an S3 object cannot
    be memory-mapped); --data-cache wins (node-local storage)."""
    from moe_train.run_dir import RunDir

    assert RunDir("/shared/run").data_cache_dir() == "/shared/run/data_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert RunDir("memory://bucket/run").data_cache_dir() == f"{tmp_path}/moe-train/data"
    assert RunDir("memory://bucket/run").data_cache_dir("/nvme/cache") == "/nvme/cache"
