"""Validated inputs, in-process: safetensors headers, index.json, config.json fields, data records, and
the CLI's one-line errors; hypothesis fuzzes config.json, HF safetensors headers and data records
(derandomised, capped; tests/test_checkpoint_integrity.py fuzzes training checkpoints with these settings).
The end-to-end cases (a real CLI process, the work dir unchanged) are in tests/test_bad_input.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_train.checkpoint.hf_layout import INDEX, HFCheckpoint, read_config
from moe_train.checkpoint.safetensors_io import SafetensorsReader
from moe_train.cli import expected_failure
from moe_train.data.formats import read_conversations, to_messages
from moe_train.data.sources import DataError
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from tests.conftest import tiny_config

FUZZ = settings(
    derandomize=True, max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
LOCAL = fsspec.filesystem("file")


# ------------------------------------------------------------------------------------ safetensors
def safetensors_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, data, why",
    [
        (
            {"a": entry([0, 8]), "b": entry([0, 8])},
            b"\0" * 8,
            "b starts at byte 0 of the data, overlapping the tensor before",
        ),
        ({"a": entry([0, 4])}, b"\0" * 4, "a: 4 bytes for shape [2] of F32"),
        (
            {"a": entry([0, 8]), "b": entry([8, 16])},
            b"\0" * 12,
            "(truncated)",
        ),
        ({"a": entry([100, 108])}, b"\0" * 8, "a starts at byte 100 of the data, leaving a gap after 0"),
        ({"a": entry([0, 8])}, b"\0" * 16, "trailing bytes"),
        ({"a": entry([0, 8], shape=(2.0,))}, b"\0" * 8, "shape [2.0] is not a list of non-negative integers"),
        ({"a": entry([0, 8], shape=(-2,))}, b"\0" * 8, "shape [-2] is not a list of non-negative integers"),
        ({"a": entry([8, 0])}, b"\0" * 8, "are not [begin, end] with 0 <= begin <= end"),
        ({"a": {"dtype": "F32"}}, b"", "a: expected dtype, shape and data_offsets"),
        ([1, 2], b"", "header is not a JSON object"),
    ],
)
def test_safetensors_headers_are_checked_before_any_byte_is_read(tmp_path, header, data, why):
    path = safetensors_file(tmp_path / "m.safetensors", header, data)
    with pytest.raises(ValueError, match="re-download or re-export it") as e:
        SafetensorsReader(LOCAL, str(path))
    assert str(e.value).startswith(f"{path} is not a valid safetensors file (") and why in str(e.value)


def test_safetensors_header_length_past_the_end_and_a_short_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    (tmp_path / "b.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"header of 1000000 bytes in a file of 10"):
        SafetensorsReader(LOCAL, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"2 bytes, shorter than the 8-byte header length"):
        SafetensorsReader(LOCAL, str(tmp_path / "b.safetensors"))


def test_a_file_written_by_the_safetensors_library_reads_back(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(0), "c": torch.tensor(3, dtype=torch.int64)}
    save_file(tensors, tmp_path / "ok.safetensors")
    reader = SafetensorsReader(LOCAL, str(tmp_path / "ok.safetensors"))
    assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())


# ------------------------------------------------------------------------------------ index.json
@pytest.mark.parametrize(
    "index, why",
    [
        ({"weight_map": {"w": "../../x.safetensors"}}, "w points to '../../x.safetensors', outside the checkpoint"),
        ({"weight_map": {"w": "/etc/x.safetensors"}}, "outside the checkpoint directory"),
        ({"weight_map": {"w": "sub/../../x.safetensors"}}, "outside the checkpoint directory"),
        ({"weight_map": {"w": "model.bin"}}, "must be .safetensors files next to the index"),
        ({"metadata": {}}, "has no weight_map (a JSON object of tensor name -> file name)"),
        ([], "has no weight_map"),
    ],
)
def test_index_json_must_stay_inside_the_model_dir(tmp_path, index, why):
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        HFCheckpoint(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}/{INDEX}") and why in str(e.value)


def test_json_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "deepseek_v2",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json:3: invalid JSON \(Expecting property name"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="unreadable JSON"):
        read_config(str(tmp_path))


# ------------------------------------------------------------------------------------ config.json
def tiny_hf() -> dict:
    return tiny_config().to_hf_dict()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", "64", "config field hidden_size='64' must be an integer; write 64 without quotes"),
        ("hidden_size", 4.5, "config field hidden_size=4.5 must be an integer; write a whole number"),
        ("num_hidden_layers", 3.0, "config field num_hidden_layers=3.0 must be an integer; write 3"),
        ("moe_layer_freq", 0, "config field moe_layer_freq=0 is out of range; it must be >= 1"),
        ("intermediate_size", -128, "config field intermediate_size=-128 is out of range; it must be >= 1"),
        ("vocab_size", 10**12, "config field vocab_size=1000000000000 is out of range; it must be >= 1 and <= 4194304"),
        ("rms_norm_eps", 0, "config field rms_norm_eps=0 is out of range; it must be above 0.0"),
        ("norm_topk_prob", "false", "config field norm_topk_prob='false' must be true or false"),
        ("rope_theta", "1e4", "config field rope_theta='1e4' must be a finite number"),
        ("eos_token_id", 512, "config field eos_token_id=512 is not below vocab_size=512"),
        ("hidden_size", None, "config field hidden_size is null"),
    ],
)
def test_config_fields_are_checked_one_by_one(tmp_path, field, value, message):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_hf(), field: value}))
    with pytest.raises(ValueError) as e:
        read_config(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}/config.json: {message}"), str(e.value)
    assert "\n" not in str(e.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(tiny_hf())), JSON, min_size=1, max_size=4))
def test_fuzzed_config_json_builds_or_fails_with_one_line(changes):
    """Any config.json gives a config or one ValueError line: never another exception or a crash."""
    try:
        cfg = DeepseekV2Config.from_hf_dict({**tiny_hf(), **changes})
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert cfg.hidden_size >= 1 and cfg.moe_layer_freq >= 1


# ------------------------------------------------------------------------------------ HF weight headers
@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A real HF checkpoint (transformers wrote it), the model on meta, and its tensors."""
    from safetensors.torch import load_file

    from moe_train import DeepseekV2ForCausalLM
    from tests.conftest import hf_reference

    d = tmp_path_factory.mktemp("hf") / "hf"
    hf_reference(tiny_config()).save_pretrained(d)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(tiny_config())
    return d, model, load_file(d / "model.safetensors")


@FUZZ
@given(st.data())
def test_fuzzed_hf_headers_are_refused_in_one_line_or_read_exactly(hf_tiny, data):
    """One field of one entry of a real model.safetensors header replaced (a dtype, a shape, offsets, any
    JSON), or a byte of the header changed: the loader's checks (reader, then shapes and dtypes against
    config.json, all before allocation) refuse it in one line, or every tensor reads exactly as written."""
    from moe_train.checkpoint.hf_layout import check_source

    d, model, tensors = hf_tiny
    path = d / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if data.draw(st.booleans()):
        header = json.loads(raw[8 : 8 + n])
        key = data.draw(st.sampled_from(sorted(header)))
        values = {
            "dtype": st.sampled_from(["I32", "U8", "F16", "BF16", "F64", "I64", "F8_E4M3", "Q4"]),
            "shape": st.lists(st.integers(-1, 5000), max_size=3),
            "data_offsets": st.lists(st.integers(-10, 2**20), min_size=2, max_size=2),
        }
        field = data.draw(st.sampled_from([*values, None]))
        if key == "__metadata__" or field is None:
            header[key] = data.draw(JSON)
        else:
            header[key][field] = data.draw(values[field] | JSON)
        text = json.dumps(header).encode()
        mutated = struct.pack("<Q", len(text)) + text + raw[8 + n :]
    else:
        at = data.draw(st.integers(0, 8 + n - 1))
        mutated = raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :]
    try:
        path.write_bytes(mutated)
        source = HFCheckpoint(str(d))
        check_source(model, source)
        read = {k: source.read(k) for k in tensors}
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    finally:
        path.write_bytes(raw)
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


# ------------------------------------------------------------------------------------ data records
@pytest.mark.parametrize(
    "text, message",
    [
        ('{"instruction": "a", "output": "' + "\\ud800" + '"}\n', "t.jsonl:1: messages[1] has a lone surrogate"),
        # pyarrow reads a 5000-digit integer as a float: not the string an output must be
        ('{"instruction": "a", "output": ' + "7" * 5000 + "}\n", "t.jsonl:1: alpaca instruction, input and output"),
        ("[" * 100000 + "]" * 100000 + "\n", "t.jsonl: JSON nested too deeply to read"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": 1, "output": "b"}\n', "t.jsonl:2: alpaca instruction"),
    ],
)
def test_bad_records_are_one_line_naming_the_file_and_line(tmp_path, text, message):
    (tmp_path / "t.jsonl").write_text(text)
    with pytest.raises(DataError) as e:
        read_conversations(str(tmp_path / "t.jsonl"))
    assert str(e.value).startswith(f"{tmp_path}/{message}") and "\n" not in str(e.value)


@FUZZ
@given(
    JSON
    | st.dictionaries(
        st.sampled_from(["instruction", "input", "output", "messages", "role", "content"]), JSON, max_size=4
    )
)
def test_fuzzed_records_give_messages_or_one_line(record):
    try:
        messages = to_messages(record, "x.jsonl:1")
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert messages and all(isinstance(m["content"], str) for m in messages)


# ------------------------------------------------------------------------------------ the CLI line
@pytest.mark.parametrize(
    "error, line",
    [
        (
            OSError(28, "No space left on device", "/w/x.pt"),
            "no space left writing /w/x.pt; free space or pass a --work-dir",
        ),
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: "
                "file write failed"
            ),
            "a write failed ([enforce fail",
        ),
        (ConnectionRefusedError(111, "Connection refused"), "cannot reach the store: [Errno 111] Connection refused"),
        (RecursionError("maximum recursion depth exceeded"), "an input is nested too deeply to read"),
    ],
)
def test_expected_failures_become_one_line(error, line):
    assert expected_failure(error).startswith(line)


def test_store_and_world_size_failures_become_one_line():
    from botocore.exceptions import EndpointConnectionError
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    assert expected_failure(EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")) == (
        'cannot reach the store: Could not connect to the endpoint URL: "http://127.0.0.1:1/b" '
        "(EndpointConnectionError); check the endpoint (FSSPEC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL), the network and "
        "the credentials"
    )
    e = ZeRORuntimeException(
        "The checkpoint being loaded used a DP world size of 2 but the current world size is 1. "
        "Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not "
        "currently supported."
    )
    assert expected_failure(e).startswith(
        "The checkpoint being loaded used a DP world size of 2 but the current world "
        "size is 1: resume with as many ranks as saved the checkpoint"
    )


def test_bugs_keep_their_traceback():
    assert expected_failure(KeyError("x")) is None and expected_failure(AssertionError()) is None


# ------------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_tmpfs(tmp_path):
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)], check=False, capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_nothing_is_marked_complete(tmp_path, small_tmpfs):
    from tests.launch import moe_train

    work = small_tmpfs / "work"
    proc = moe_train(["train", "tiny", "--max-steps", "2", "--save-steps", "1", "--work-dir", str(work)], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"Error: no space left in the work dir {work} (") and "Traceback" not in proc.stderr
    # the data cache, written before the disk filled, is complete; no checkpoint or export is, and no
    # partial cache entry is left
    assert not [p for p in work.rglob("COMPLETE") if "data_cache" not in p.parts]
    # the lease stays one file (its tombstone, or on a full disk its last record: its pid is gone), never deleted
    assert [p.name for p in (work / "lease").iterdir()] == ["00000001.json"]
    assert not list(work.glob("data_cache/.*tmp*"))
