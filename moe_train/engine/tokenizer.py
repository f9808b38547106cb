"""The tokenizer of a run: found next to the model (or named by the recipe), checked against the model."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Any

from moe_train.checkpoint.hf_layout import TOKENIZER_FILES, copy_files
from moe_train.recipes import Recipe
from moe_train.storage import is_local, redact, resolve


def local_tokenizer_dir(recipe: Recipe, model_url: str | None) -> str:
    """A local directory with the tokenizer files (AutoTokenizer cannot read object stores).

    The tokenizer is the recipe's ``tokenizer`` (``--tokenizer``); the CLI clears it when ``--model``
    is given without ``--tokenizer``, so a model brings its own tokenizer."""
    src = recipe.tokenizer or model_url
    if src is None:
        raise ValueError(
            f"recipe {recipe.name} names no tokenizer or model; pass --model PATH|URL or --tokenizer PATH|URL"
        )
    fs, root = resolve(src)
    if not fs.exists(posixpath.join(root, "tokenizer.json")) and not fs.exists(posixpath.join(root, "tokenizer.model")):
        raise FileNotFoundError(
            f"no tokenizer (tokenizer.json or tokenizer.model) in {redact(src)}; put the "
            "tokenizer files next to the model or pass --tokenizer PATH|URL"
        )
    if is_local(fs):
        return root
    tmp = tempfile.mkdtemp(prefix="moe-train-tokenizer-")
    copy_files(src, *resolve(tmp), TOKENIZER_FILES)
    return tmp


def load_tokenizer(tokenizer_dir: str, source: str) -> Any:
    """The tokenizer in the local ``tokenizer_dir`` (copied from ``source``), read by transformers without
    ever running code from that directory: one that needs its own Python (an ``auto_map``) is refused."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
    names = [n for n in ("tokenizer_config.json", "config.json") if "auto_map" in _json(tokenizer_dir, n)]
    where = f"{redact(source).rstrip('/')}/{names[0] if names else 'tokenizer_config.json'}"
    raise ValueError(
        f"{where} asks to run Python code from its directory (auto_map), and moe-train never runs code from a "
        "model directory; pass --tokenizer with a tokenizer transformers reads itself (tokenizer.json and a "
        "tokenizer_class of transformers), or remove auto_map if the class it names is one of transformers'"
    )


def _json(directory: str, name: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, name)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def check_tokenizer(cfg: Any, tokenizer: Any, source: str) -> None:
    """The tokenizer fits the model: every token id has an embedding row, and the special ids agree
    with config.json (an out-of-vocab or different eos would make `generate` never stop)."""
    where = f"the tokenizer in {redact(source)}"
    fix = "pass the model's own tokenizer with --tokenizer, or fix config.json"
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{where} has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}; {fix}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ours, theirs = getattr(cfg, name), getattr(tokenizer, name)
        if ours is not None and not 0 <= ours < cfg.vocab_size:
            raise ValueError(
                f"config.json {name}={ours} is outside the vocabulary (vocab_size {cfg.vocab_size}); "
                f"set {name} to the tokenizer's id ({theirs})"
            )
        if name != "pad_token_id" and ours is not None and theirs is not None and ours != theirs:
            token = getattr(tokenizer, name.replace("_id", ""))
            raise ValueError(f"config.json {name}={ours} but {where} has {token!r} = {theirs}; {fix}")
