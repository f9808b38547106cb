"""The HF checkpoint layout: round trips with transformers, fsspec targets, bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_train import DeepseekV2ForCausalLM
from moe_train.checkpoint.hf_layout import COMPLETE, INDEX, is_complete
from tests.conftest import hf_reference, tiny_config


def all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("impl,shard", [("shard", 4), ("origin", None)])
def test_round_trip_through_transformers_is_bit_identical(tmp_path, impl, shard):
    from transformers import AutoModelForCausalLM

    hf = hf_reference(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepseekV2ForCausalLM.from_pretrained(
        str(tmp_path / "hf"), moe_implementation=impl, expert_in_one_shard=shard
    )
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_size="40KB")

    original, written = all_tensors(tmp_path / "hf"), all_tensors(tmp_path / "ours")
    assert original.keys() == written.keys()
    for k in original:
        assert torch.equal(original[k], written[k]), k
    assert len([f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors")]) > 1  # really sharded
    assert is_complete(str(tmp_path / "ours"))

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 20))
    assert torch.equal(back(ids).logits, hf(ids).logits)


def test_loading_does_not_assume_how_experts_are_spread_over_files(tmp_path):
    """Experts of one shard split across files in an arbitrary order still load exactly."""
    hf = hf_reference(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    tensors = all_tensors(tmp_path / "hf")
    keys = sorted(tensors, key=lambda k: hash(k) % 7)  # scatter keys over 3 files
    weight_map = {}
    (tmp_path / "mixed").mkdir()
    for i in range(3):
        part = {k: tensors[k] for k in keys[i::3]}
        save_file(part, tmp_path / "mixed" / f"part{i}.safetensors")
        weight_map.update(dict.fromkeys(part, f"part{i}.safetensors"))
    (tmp_path / "mixed" / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "mixed" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ref = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    mixed = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "mixed"))
    for (n, a), (_, b) in zip(ref.named_parameters(), mixed.named_parameters()):
        assert torch.equal(a, b), n


def test_memory_url_round_trip(tmp_path):
    hf = hf_reference(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained("memory://ckpt/tiny", max_shard_size="100KB")
    again = DeepseekV2ForCausalLM.from_pretrained("memory://ckpt/tiny")
    for (n, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_s3_round_trip_against_a_real_s3_server(tmp_path, s3_server):
    hf = hf_reference(tiny_config())
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    url = f"s3://{s3_server['bucket']}/roundtrip"
    ours.save_pretrained(url, max_shard_size="100KB", **s3_server["storage_options"])
    again = DeepseekV2ForCausalLM.from_pretrained(url, **s3_server["storage_options"])
    for (n, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    assert is_complete(url, s3_server["storage_options"])


def test_saved_header_is_readable_by_safetensors(tmp_path):
    model = DeepseekV2ForCausalLM(tiny_config())
    model.save_pretrained(str(tmp_path))
    index = json.loads((tmp_path / INDEX).read_text())
    for name in set(index["weight_map"].values()):
        with safe_open(tmp_path / name, "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == name}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v2"


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def hf_dir(tmp_path):
    hf_reference(tiny_config()).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_weight_keys_are_listed(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir))
    assert "missing model.layers.1.mlp.experts.3.up_proj.weight" in msg


def test_unexpected_weight_keys_are_listed(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.mlp.experts.99.up_proj.weight"] = torch.zeros(1)
    save_file(tensors, hf_dir / "model.safetensors")
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir))
    assert "unexpected model.layers.1.mlp.experts.99.up_proj.weight" in msg


def test_wrong_shape_is_named(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, hf_dir / "model.safetensors")
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir))
    assert "model.layers.0.self_attn.o_proj.weight has shape [3, 3]" in msg


def test_path_that_does_not_exist(tmp_path):
    msg = one_line_error(FileNotFoundError, DeepseekV2ForCausalLM.from_pretrained, str(tmp_path / "nope"))
    assert "does not exist" in msg
    msg = one_line_error(FileNotFoundError, DeepseekV2ForCausalLM.from_pretrained, "memory://no/such/model")
    assert "does not exist" in msg


def test_config_that_is_not_deepseek_v2(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir))
    assert "model_type='llama'" in msg and "deepseek_v2" in msg


def test_bad_shard_size_on_load(hf_dir):
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir), expert_in_one_shard=5)
    assert "use one of [1, 2, 4, 8]" in msg


def test_partial_export_is_not_complete(tmp_path):
    """An export that dies midway leaves no index and no COMPLETE marker."""
    from moe_train.checkpoint.hf_layout import HFExportWriter, expected_hf_keys
    from moe_train.checkpoint.safetensors_io import PlannedTensor

    model = DeepseekV2ForCausalLM(tiny_config())
    model.save_pretrained(str(tmp_path))  # a previous complete export at the same place
    assert is_complete(str(tmp_path))
    expected = expected_hf_keys(model)
    params = dict(model.named_parameters())
    planned = [PlannedTensor(k, torch.float32, s) for k, (_, s) in expected.items()]
    writer = HFExportWriter(str(tmp_path), planned, max_shard_size="50KB")
    for i, (key, (slot, _)) in enumerate(expected.items()):
        if i == len(expected) // 2:
            break  # the "crash"
        writer.write(key, slot.view(params[slot.param]))
    writer.abort()
    assert not is_complete(str(tmp_path))
    assert not (tmp_path / INDEX).exists() and not (tmp_path / COMPLETE).exists()
    with pytest.raises(FileNotFoundError):
        DeepseekV2ForCausalLM.from_pretrained(str(tmp_path))


def test_aborted_export_to_s3_uploads_no_truncated_shard(s3_server):
    import s3fs

    from moe_train.checkpoint.hf_layout import HFExportWriter, expected_hf_keys
    from moe_train.checkpoint.safetensors_io import PlannedTensor

    model = DeepseekV2ForCausalLM(tiny_config())
    expected = expected_hf_keys(model)
    params = dict(model.named_parameters())
    url = f"s3://{s3_server['bucket']}/aborted"
    writer = HFExportWriter(
        url,
        [PlannedTensor(k, torch.float32, s) for k, (_, s) in expected.items()],
        max_shard_size="10GB",
        storage_options=s3_server["storage_options"],
    )
    for i, (key, (slot, _)) in enumerate(expected.items()):
        if i == 10:
            break
        writer.write(key, slot.view(params[slot.param]))
    writer.abort()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/model-00001-of-00001.safetensors")
    assert not is_complete(url, s3_server["storage_options"])


# ----------------------------------------------------------------------------- HF inputs checked before allocation
def retype_in_header(path, key: str, dtype: str) -> None:
    """Rewrite one tensor's dtype in a safetensors header, the bytes left as they are."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_a_float_weight_retyped_as_integers_of_the_same_size_is_refused(hf_dir):
    key = "model.layers.1.mlp.experts.0.down_proj.weight"
    retype_in_header(hf_dir / "model.safetensors", key, "I32")  # 4 bytes, like F32: the reader takes it
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir))
    assert f"{key} is stored as int32, but it is a float weight" in msg


def test_a_config_implying_more_memory_than_the_host_has_is_refused_before_allocation(hf_dir):
    import time

    from moe_train.checkpoint.hf_layout import host_memory

    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(vocab_size=4194304, hidden_size=262144)  # 2 x 4 TiB of embeddings: in range, field by field
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    msg = one_line_error(ValueError, DeepseekV2ForCausalLM.from_pretrained, str(hf_dir))
    assert time.perf_counter() - t0 < 30  # refused from the config alone, nothing allocated
    assert f"{hf_dir}/config.json implies " in msg and "GiB of float32 weights, more than this host's" in msg
    assert f"{host_memory() / 2**30:,.1f} GiB of memory" in msg


def test_every_header_is_compared_with_the_config_before_training_allocates(hf_dir, tmp_path):
    """The trainer checks the headers right after reading config.json: a mismatch is one line before
    the model is built (a config whose sizes were edited up would otherwise be allocated first)."""
    from moe_train.recipes import ASSETS
    from tests.launch import moe_train

    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["moe_intermediate_size"] = 4096  # 128x the stored experts
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    args = ["train", "tiny", "--model", str(hf_dir), "--tokenizer", str(ASSETS / "tiny_tokenizer")]
    proc = moe_train([*args, "--work-dir", str(tmp_path / "w"), "--max-steps", "1", "--no-export"], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "experts.0.down_proj.weight has shape [64, 32], config.json implies [64, 4096]" in errors[0]
    assert "[moe-train] data:" not in proc.stdout  # refused before the data and the model
