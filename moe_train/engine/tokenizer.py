"""The tokenizer of a run: found next to the model (or named by the recipe), checked against the model."""

from __future__ import annotations

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
