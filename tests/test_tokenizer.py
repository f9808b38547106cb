"""Which tokenizer a run uses, and the start-up checks of tokenizer against model config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import hf_reference, tiny_config
from tests.launch import moe_train

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).resolve().parents[1] / "moe_train" / "assets" / "tiny_tokenizer"


def _model(root: Path, name: str, tokenizer: bool = True, marker: int = 4321, **config) -> Path:
    """A tiny HF checkpoint; its tokenizer is the debug one with a marker in tokenizer_config.json."""
    d = root / name
    # a vocab_size override shapes the weights too (start-up checks weights against config.json first)
    hf_reference(tiny_config(**{k: v for k, v in config.items() if k == "vocab_size"})).save_pretrained(d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
    if tokenizer:
        (d / "tokenizer.json").write_bytes((ASSETS / "tokenizer.json").read_bytes())
        tc = json.loads((ASSETS / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**tc, "model_max_length": marker}))
    return d


def _train(tmp: Path, *args: str):
    return moe_train(
        ["train", "tiny", "--work-dir", str(tmp / "w"), "--max-steps", "1", "--save-steps", "0", *args],
        tmp,
        timeout=180,
    )


def _error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_model_brings_its_own_tokenizer_into_the_export(tmp_path):
    model = _model(tmp_path, "model")
    proc = _train(tmp_path, "--model", str(model))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads((tmp_path / "w" / "hf_model" / "tokenizer_config.json").read_text())
    assert exported["model_max_length"] == 4321  # the model's, not the recipe's debug tokenizer
    assert f"tokenizer: {model}" in proc.stdout


def test_tokenizer_option_overrides_the_model_and_errors_name_the_fix(tmp_path):
    bare = _model(tmp_path, "bare", tokenizer=False)
    line = _error(_train(tmp_path, "--model", str(bare)))
    assert "no tokenizer (tokenizer.json" in line and "--tokenizer" in line
    # --tokenizer fills the gap; start-up then checks it against the model's config
    small = _model(tmp_path, "small", tokenizer=False, vocab_size=256)
    line = _error(_train(tmp_path, "--model", str(small), "--tokenizer", str(ASSETS)))
    assert "has 512 tokens but the model's vocab_size is 256" in line and "--tokenizer" in line
    bos = _model(tmp_path, "bos", bos_token_id=7)
    line = _error(_train(tmp_path, "--model", str(bos)))
    assert "config.json bos_token_id=7 but the tokenizer" in line and "= 0" in line
    eos = _model(tmp_path, "eos", eos_token_id=900)
    line = _error(_train(tmp_path, "--model", str(eos), "--tokenizer", str(ASSETS)))
    # config.json's own validation names it before the tokenizer is read
    assert "config.json: config field eos_token_id=900 is not below vocab_size=512" in line
    assert not (tmp_path / "w" / "hf_model").exists()


# --- model sources -----------------------------------------------------------------------------


def test_hf_urls_resolve_to_the_hub_filesystem_and_recipes_use_them():
    from huggingface_hub import HfFileSystem

    from moe_train.recipes import RECIPES
    from moe_train.storage import resolve

    fs, path = resolve("hf://deepseek-ai/DeepSeek-V2-Lite-Chat")
    assert isinstance(fs, HfFileSystem) and path == "deepseek-ai/DeepSeek-V2-Lite-Chat"
    assert all(r.model.startswith("hf://") for r in RECIPES.values() if r.model)


def test_unreachable_hub_and_a_bare_model_id_are_one_line(tmp_path):
    """No network here: the Hub cannot be reached, which must read as one line with the way out."""
    line = _error(_train(tmp_path, "--model", "hf://deepseek-ai/DeepSeek-V2-Lite-Chat"))
    assert "cannot reach the Hugging Face Hub for hf://deepseek-ai/DeepSeek-V2-Lite-Chat" in line
    assert "hf download deepseek-ai/DeepSeek-V2-Lite-Chat --local-dir DIR" in line
    line = _error(_train(tmp_path, "--model", "deepseek-ai/DeepSeek-V2-Lite-Chat"))
    assert "is not a local directory; for the Hugging Face Hub model pass --model hf://deepseek-ai/" in line
