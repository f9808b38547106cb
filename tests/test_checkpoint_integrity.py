"""Training checkpoints prove their bytes: digests in COMPLETE, fallback on any damage, exports never
written over their inputs; hypothesis fuzzes COMPLETE, state.json and the safetensors headers.

One real run (1 process, tiny, checkpoints at steps 1-3) is copied and damaged for real: bytes
overwritten in the middle of a file, same-length edits, keys removed or retyped.  The 2-rank
fallback (one rank finds the damage, every rank falls back) is in tests/test_elastic.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import fsspec
import pytest
import torch
import xxhash
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_train.checkpoint.export import export_checkpoint
from moe_train.checkpoint.hf_layout import parameter_shapes
from moe_train.checkpoint.manifest import seal_of
from moe_train.checkpoint.training_state import KINDS, CheckpointManager, TrainingCheckpoint, UnsupportedFormat
from moe_train.cli import main
from moe_train.models import spec_of
from tests.launch import check, moe_train, summary
from tests.test_validation import FUZZ, JSON

pytestmark = pytest.mark.slow  # the fixture is a real training run
LOCAL = fsspec.filesystem("file")
MASTER = "master-rank00000-of-00001.safetensors"


def step_dir(work: Path, step: int) -> Path:
    return work / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Steps 1, 2, 3 of the tiny recipe, a checkpoint after each."""
    tmp = tmp_path_factory.mktemp("integrity")
    args = ["train", "tiny", "--work-dir", str(tmp / "run"), "--max-steps", "3", "--save-steps", "1", "--no-export"]
    check(moe_train([*args, "--cfg-options", "save_total_limit=5"], tmp, timeout=600))
    return tmp / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run / "checkpoints", tmp_path / "w" / "checkpoints")
    return tmp_path / "w"


def overwrite_middle(path: Path, n: int = 4000) -> None:
    """``n`` bytes in the middle of the file replaced (same size): 1e4 as float32, as in the issue."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 // 4 * 4
    data[mid : mid + n] = struct.pack("<f", 1e4) * (n // 4)
    path.write_bytes(bytes(data))


def reseal(step: Path, *, state: bytes | None = None, complete: dict | None = None) -> None:
    """Write ``state`` (and/or COMPLETE's content) with the digests and seal made to match, as a person
    who "fixed" a checkpoint by hand would: only the schema checks can then catch what is wrong."""
    complete = json.loads((step / "COMPLETE").read_text()) if complete is None else complete
    if state is not None:
        (step / "state.json").write_bytes(state)
        complete["files"]["state.json"] = {"size": len(state), "digest": xxhash.xxh3_64_hexdigest(state)}
    if isinstance(complete, dict):
        complete["seal"] = seal_of(complete)
    (step / "COMPLETE").write_text(json.dumps(complete))


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}  # building the model on meta takes 0.1-0.3 s: once per config


def all_tensors(ckpt: TrainingCheckpoint) -> dict[str, torch.Tensor]:
    """Every HF tensor of every kind, each range read and checked against its digest."""
    key = repr(ckpt.config)
    if key not in _SHAPES:
        with torch.device("meta"):
            _SHAPES[key] = parameter_shapes(spec_of(ckpt.config).build(ckpt.config))
    shapes = _SHAPES[key]
    out = {}
    for kind in KINDS:
        index = ckpt.ranges(kind, shapes)
        for key, entries in index.items():
            out[f"{kind}/{key}"] = full = torch.empty(sum(e.end - e.start for e in entries))
            ckpt.read_into(entries, 0, full)
    ckpt.close()
    return out


# ------------------------------------------------------------------------------------ 1. digests
def test_complete_records_a_digest_per_entry_and_per_json_file(run):
    d = step_dir(run, 3)
    complete = json.loads((d / "COMPLETE").read_text())
    assert complete["format"] == "moe-train-checkpoint/2" and complete["digest"] == "xxh3_64"
    assert complete["seal"] == seal_of(complete)
    on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(complete["files"]) == on_disk
    for name, record in complete["files"].items():
        data = (d / name).read_bytes()
        assert record["size"] == len(data), name
        if not name.endswith(".safetensors"):
            assert record["digest"] == xxhash.xxh3_64_hexdigest(data), name
            continue
        # recomputed here from the file, independently of the reader: the header, then each entry in file order
        (n,) = struct.unpack("<Q", data[:8])
        assert record["header"] == xxhash.xxh3_64_hexdigest(data[: 8 + n])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__")
        spans = sorted(v["data_offsets"] for v in header.values())
        expected = "".join(xxhash.xxh3_64_hexdigest(data[8 + n + lo : 8 + n + hi]) for lo, hi in spans)
        assert record["entries"] == expected and len(spans) > 80, name  # one per HF tensor's range


def test_overwritten_bytes_are_found_where_they_are_read_and_export_is_one_line(run, tmp_path):
    work = copy_run(run, tmp_path)
    victim = step_dir(work, 3) / MASTER
    overwrite_middle(victim)
    ckpt = TrainingCheckpoint(LOCAL, str(step_dir(work, 3)))  # sizes and JSON are intact: only reading finds it
    with pytest.raises(ValueError, match=r"the range .*@\d+ \(\d+ values\) does not match its digest in COMPLETE"):
        all_tensors(ckpt)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(step_dir(work, 3)), str(out)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and f"{victim}: the range" in errors[0], result.output
    assert not (out / "COMPLETE").exists() and not (out / "model.safetensors.index.json").exists()
    # a header byte changed the same way is caught before any tensor is read
    data = bytearray((step_dir(work, 2) / MASTER).read_bytes())
    data[20:24] = b"@@@@" if data[20:24] != b"@@@@" else b"####"
    (step_dir(work, 2) / MASTER).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"the safetensors header does not match its digest"):
        TrainingCheckpoint(LOCAL, str(step_dir(work, 2))).ranges("master", {})


def test_entries_above_the_read_buffer_stream_in_pieces_and_are_checked_whole(run, tmp_path, monkeypatch):
    """With a 4 KiB buffer most entries are read in pieces (the path of real models' MiB entries): the
    tensors read are the same, and an overwrite is still found."""
    from moe_train.checkpoint import training_state

    work = copy_run(run, tmp_path)
    whole = all_tensors(TrainingCheckpoint(LOCAL, str(step_dir(work, 3))))
    monkeypatch.setattr(training_state, "CHUNK", 4096)
    pieces = all_tensors(TrainingCheckpoint(LOCAL, str(step_dir(work, 3))))
    assert whole.keys() == pieces.keys() and all(torch.equal(whole[k], pieces[k]) for k in whole)
    overwrite_middle(step_dir(work, 3) / MASTER)
    with pytest.raises(ValueError, match=r"the range .*@\d+ \(\d+ values\) does not match its digest"):
        all_tensors(TrainingCheckpoint(LOCAL, str(step_dir(work, 3))))


# ------------------------------------------------------------------------------------ 2. fallback
DAMAGES = {
    "state.json step 3 -> 9 (same length)": lambda d: (d / "state.json").write_bytes(
        (d / "state.json").read_bytes().replace(b'"step": 3,', b'"step": 9,', 1)
    ),
    "COMPLETE without world_size": lambda d: (d / "COMPLETE").write_text(
        json.dumps({k: v for k, v in json.loads((d / "COMPLETE").read_text()).items() if k != "world_size"})
    ),
    "COMPLETE world_size as a string, resealed": lambda d: reseal(
        d, complete={**json.loads((d / "COMPLETE").read_text()), "world_size": "1"}
    ),
    "state.json loader renamed, resealed": lambda d: reseal(
        d, state=(d / "state.json").read_bytes().replace(b'"loader":', b'"loadex":')
    ),
    "state.json recipe.seed a list, resealed": lambda d: reseal(
        d, state=(d / "state.json").read_bytes().replace(b'"seed": 0, "deepspeed"', b'"seed": [], "deepspeed"')
    ),
    "rng file truncated": lambda d: (d / "rng-rank00000-of-00001.json").write_bytes(
        (d / "rng-rank00000-of-00001.json").read_bytes()[:-10]
    ),
    "COMPLETE is a pickle": lambda d: (d / "COMPLETE").write_bytes(b"\x80\x04\x95\x00"),
}
MESSAGES = {
    "state.json step 3 -> 9 (same length)": "state.json does not match its digest in COMPLETE",
    "COMPLETE without world_size": "COMPLETE: world_size is missing",
    "COMPLETE world_size as a string, resealed": 'COMPLETE: world_size is "1", not an integer',
    "state.json loader renamed, resealed": "state.json: loader is missing",
    "state.json recipe.seed a list, resealed": "state.json: recipe.seed is [], not an integer",
    "rng file truncated": "rng-rank00000-of-00001.json is ",  # N - 10 bytes, COMPLETE lists N bytes
    "COMPLETE is a pickle": "COMPLETE is not JSON",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_auto_moves_a_damaged_checkpoint_aside_with_one_line_and_takes_the_newest_intact_one(run, tmp_path, damage):
    work = copy_run(run, tmp_path)
    before = tree_hash(step_dir(work, 2))
    DAMAGES[damage](step_dir(work, 3))
    lines: list[str] = []
    ckpt = CheckpointManager(str(work), 0, 5).resolve("auto", log=lines.append)
    assert ckpt is not None and ckpt.step == 2 and tree_hash(step_dir(work, 2)) == before
    aside = list((work / "checkpoints").glob("damaged-*/step-00000003"))
    assert len(aside) == 1 and (aside[0] / "COMPLETE").exists() and not step_dir(work, 3).exists()
    assert len(lines) == 1 and f"moved {step_dir(work, 3)} to {aside[0].parent}: " in lines[0], lines
    assert MESSAGES[damage] in lines[0] and "\n" not in lines[0], lines


def test_a_requeued_job_resumes_past_damaged_json_and_damaged_ranges(run, tmp_path):
    """Step 3's COMPLETE lacks a key (refused when the resume point is chosen); step 2's master file has
    4000 bytes overwritten (found while loading): the run moves both aside and continues from step 1,
    and its step 2 is the uninterrupted run's step 2 exactly."""
    work = copy_run(run, tmp_path)
    DAMAGES["COMPLETE without world_size"](step_dir(work, 3))
    overwrite_middle(step_dir(work, 2) / MASTER)
    args = ["train", "tiny", "--work-dir", str(work), "--resume", "auto", "--max-steps", "2", "--save-steps", "0"]
    proc = check(moe_train([*args, "--no-export", "--cfg-options", "save_total_limit=5"], tmp_path, timeout=600))
    moved = [line for line in proc.stdout.splitlines() if " moved " in line]
    assert len(moved) == 2, proc.stdout
    assert f"moved {step_dir(work, 3)} to " in moved[0] and "COMPLETE: world_size is missing" in moved[0]
    assert f"moved {step_dir(work, 2)} to " in moved[1] and f"{MASTER}: the range" in moved[1]
    assert f"resumed from {step_dir(work, 1)} at step 1" in proc.stdout
    assert sorted(p.name for p in (work / "checkpoints").glob("damaged-*/*")) == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (work / "checkpoints").glob("step-*")) == ["step-00000001"]
    assert summary(work)["segment_losses"] == summary(run)["losses"][1:2]


def test_no_intact_checkpoint_is_one_line_and_nothing_is_moved(run, tmp_path):
    work = copy_run(run, tmp_path)
    for step in (1, 2, 3):
        overwrite_middle(step_dir(work, step) / "state.json", 8)
    with pytest.raises(ValueError, match=r"no checkpoint in .* verifies \(.*step-00000003/state.json does not match"):
        CheckpointManager(str(work), 0, 5).resolve("auto", log=print)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [f"step-0000000{s}" for s in (1, 2, 3)]


def test_the_older_format_is_refused_with_one_line_and_not_moved(run, tmp_path):
    work = copy_run(run, tmp_path)
    d = step_dir(work, 3)
    complete = json.loads((d / "COMPLETE").read_text())
    old = {"format": "moe-train-checkpoint/1", "step": 3, "world_size": 1, "files": {}}
    old["files"] = {name: r["size"] for name, r in complete["files"].items()}
    (d / "COMPLETE").write_text(json.dumps(old))
    with pytest.raises(UnsupportedFormat, match=r"is a moe-train-checkpoint/1 checkpoint, written by an older"):
        CheckpointManager(str(work), 0, 5).resolve("auto", log=print)
    assert d.exists() and not list((work / "checkpoints").glob("damaged-*"))
    result = CliRunner().invoke(main, ["export", str(d), str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "older moe-train" in result.output


# ------------------------------------------------------------------------------------ 3. outputs
@pytest.fixture()
def read_only_dir(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("mounting a read-only tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_export_never_lands_on_its_inputs_and_unwritable_outputs_are_one_line(run, tmp_path, read_only_dir):
    work = copy_run(run, tmp_path)
    src, other = step_dir(work, 3), step_dir(work, 1)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "link").symlink_to(src)
    cases = {
        str(src): "would land in the checkpoint it reads",
        str(src / "hf"): "would land in the checkpoint it reads",
        str(tmp_path / "link"): "would land in the checkpoint it reads",
        str(work / "checkpoints"): "the work dir's training checkpoints",
        str(work / "checkpoints" / "hf_model"): "the work dir's training checkpoints",
        str(run / "checkpoints" / "step-00000001" / "hf"): f"inside the training checkpoint {step_dir(run, 1)}",
        str(tmp_path / "a-file" / "out"): "cannot write the export to",
        str(read_only_dir / "out"): "cannot write the export to",
    }
    before = {d: tree_hash(d) for d in (src, other, step_dir(run, 1))}
    for out, message in cases.items():
        result = CliRunner().invoke(main, ["export", str(src), out])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(errors) == 1 and message in errors[0], (out, result.output)
        assert "Traceback" not in result.output
    assert {d: tree_hash(d) for d in before} == before
    assert not (work / "checkpoints" / "hf_model").exists() and not list(read_only_dir.iterdir())
    TrainingCheckpoint(LOCAL, str(src))  # still complete and intact
    export_checkpoint(str(src), str(work / "hf_model-step-3"), log=lambda _: None)  # beside the checkpoints: fine
    assert (work / "hf_model-step-3" / "COMPLETE").exists()


# ------------------------------------------------------------------------------------ 5. fuzzing
def _mutate_bytes(data: bytes, draw) -> bytes:
    """A byte-level mutation of a real file: overwrite, insert, delete or truncate somewhere."""
    kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "truncate":
        return data[:at]
    chunk = draw(st.binary(min_size=1, max_size=8))
    if kind == "overwrite":
        return data[:at] + chunk + data[at + len(chunk) :]
    if kind == "insert":
        return data[:at] + chunk + data[at:]
    return data[:at] + data[at + len(chunk) :]


def _mutate_json(obj, draw):
    """A JSON-level mutation: one key somewhere removed, renamed or given another value."""
    path = []
    node = obj
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        k = draw(st.sampled_from(keys[:50]))
        path.append(k)
        node = node[k]
    if not path:
        return draw(JSON)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    how = draw(st.sampled_from(["remove", "rename", "replace"]))
    if how == "remove" or (how == "rename" and isinstance(parent, list)):
        del parent[path[-1]]
    elif how == "rename":
        parent[path[-1] + draw(st.sampled_from(["x", "_", " "]))] = parent.pop(path[-1])
    else:
        parent[path[-1]] = draw(JSON)
    return obj


TARGETS = ["COMPLETE", "state.json", MASTER]


@pytest.fixture(scope="module")
def fuzz_dir(run, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "step"
    shutil.copytree(step_dir(run, 3), d)
    return d


@pytest.fixture(scope="module")
def reference_tensors(fuzz_dir) -> dict[str, torch.Tensor]:
    return all_tensors(TrainingCheckpoint(LOCAL, str(fuzz_dir)))


def _verify(d: Path) -> dict[str, torch.Tensor] | None:
    """What a resume or an export would read: the tensors, or None when the checkpoint is refused with
    one ValueError line (any other exception fails the test)."""
    try:
        ckpt = TrainingCheckpoint(LOCAL, str(d))
        ckpt.rng(0)
        return all_tensors(ckpt)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return None


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_N", 80)))
@given(st.data())
def test_fuzzed_checkpoint_files_are_refused_in_one_line_and_never_read_when_damaged(fuzz_dir, reference_tensors, data):
    """Byte-level mutations of the real COMPLETE, state.json and master header: whatever verifies reads
    exactly the original tensors (a whitespace change of COMPLETE's JSON is no damage)."""
    name = data.draw(st.sampled_from(TARGETS))
    path = fuzz_dir / name
    original = path.read_bytes()
    if name == MASTER:  # the header and the first entries
        (n,) = struct.unpack("<Q", original[:8])
        mutated = _mutate_bytes(original[: 8 + n + 64], data.draw) + original[8 + n + 64 :]
    else:
        mutated = _mutate_bytes(original, data.draw)
    try:
        path.write_bytes(mutated)
        read = _verify(fuzz_dir)
    finally:
        path.write_bytes(original)
    if read is not None:
        assert name == "COMPLETE" and json.loads(mutated) == json.loads(original) or mutated == original
        assert all(torch.equal(read[k], v) for k, v in reference_tensors.items())


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_N", 80)))
@given(st.data())
def test_fuzzed_and_resealed_json_fails_with_one_line_naming_the_key(fuzz_dir, data):
    """JSON-level mutations of COMPLETE, state.json and the master header, with every digest and the seal
    made to match: the schema checks give one ValueError line (or the checkpoint still reads), never
    another exception."""
    name = data.draw(st.sampled_from(TARGETS))
    originals = {n: (fuzz_dir / n).read_bytes() for n in TARGETS}
    try:
        if name == "COMPLETE":
            reseal(fuzz_dir, complete=_mutate_json(json.loads(originals[name]), data.draw))
        elif name == "state.json":
            reseal(fuzz_dir, state=json.dumps(_mutate_json(json.loads(originals[name]), data.draw)).encode())
        else:
            raw = originals[name]
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.dumps(_mutate_json(json.loads(raw[8 : 8 + n]), data.draw)).encode()
            header += b" " * (-len(header) % 8)
            body = struct.pack("<Q", len(header)) + header + raw[8 + n :]
            (fuzz_dir / name).write_bytes(body)
            complete = json.loads(originals["COMPLETE"])
            complete["files"][name]["size"] = len(body)
            complete["files"][name]["header"] = xxhash.xxh3_64_hexdigest(body[: 8 + len(header)])
            reseal(fuzz_dir, complete=complete)
        _verify(fuzz_dir)
    finally:
        for n, raw in originals.items():
            (fuzz_dir / n).write_bytes(raw)
