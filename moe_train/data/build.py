"""Training data end to end: read each source, detect its format, render the chat template, tokenize,
pack, and keep the packs in the memory-mapped cache (``moe_train/data/cache.py``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator

from moe_train.data import cache
from moe_train.data.formats import parse_columns, read_samples
from moe_train.data.packing import PackStats
from moe_train.data.sources import HINT, DataError, resolve_sources
from moe_train.data.templates import ChatTemplate, encode_samples, named_template
from moe_train.storage import redact

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def build_packed_dataset(
    paths: list[str] | str,
    tokenizer,
    template: str | ChatTemplate = "deepseek_v2",
    max_length: int = 8192,
    varlen: bool = True,
    too_long: str = "truncate",
    seed: int = 0,
    data_format: str | None = None,
    columns: dict[str, str] | str | None = None,
    cache_dir: str | None = None,
    tokenizer_dir: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> tuple[cache.PackedDataset, PackStats]:
    """Read, tokenize and pack the data into the cache under ``cache_dir`` (once; see
    ``moe_train/data/cache.py``), and map it: what the trainer calls.  Without ``cache_dir`` the entry
    lives in a temporary directory as long as the returned dataset.  ``tokenizer_dir`` holds the
    tokenizer's files, copied into the entry with the template (their bytes key the cache)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    template = named_template(template) if isinstance(template, str) else template
    columns = parse_columns(columns)
    sources = resolve_sources(paths)
    inputs = [src.identity() for src in sources]
    own_dir = cache_dir is None
    root = tempfile.mkdtemp(prefix="moe-train-data-") if own_dir else cache_dir
    key = cache.cache_key(
        {
            "inputs": inputs,
            "tokenizer": _tokenizer_digest(tokenizer),
            "template": template.jinja,
            "data_format": data_format,
            "columns": columns,
            "max_length": max_length,
            "varlen": varlen,
            "too_long": too_long,
            "seed": seed,
        }
    )

    def build(entry: str) -> None:
        t0 = time.perf_counter()
        read = [0]

        def samples() -> Iterator[tuple[list[int], list[int]]]:
            for src in sources:
                for batch, rows in read_samples(src, data_format, columns):
                    read[0] += len(batch)
                    wheres = [lambda r=r, src=src: src.where(r) for r in rows]
                    yield from encode_samples(tokenizer, batch, template, wheres)

        stats = cache.write_packs(entry, samples(), max_length, varlen, too_long, seed)
        if not read[0]:
            raise DataError(f"no samples found in {paths}; {HINT}")
        if not stats.packs:
            raise DataError(
                f"{redact(str(paths))} produced no trainable samples at max_length {max_length} ({read[0]} read, "
                f"{stats.dropped} dropped); raise --max-length or keep too_long='truncate'"
            )
        _save_tokenizer(tokenizer, tokenizer_dir, template, os.path.join(entry, cache.TOKENIZER))
        cache.save_meta(
            entry,
            {
                "stats": stats.__dict__,
                "read": read[0],
                "inputs": [src.identity() for src in sources],
                "template": {"name": template.name, "source": template.source},
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
        log(f"data cache: tokenized and packed {read[0]} samples in {time.perf_counter() - t0:.1f}s")

    entry = cache.open_or_build(root, key, build, log)
    dataset = cache.PackedDataset(entry)
    if own_dir:
        weakref.finalize(dataset, shutil.rmtree, root, True)
    else:
        log(f"data cache: {entry} ({len(dataset)} packs, memory-mapped)")
    return dataset, dataset.stats


def _tokenizer_digest(tokenizer) -> str:
    """What of the tokenizer decides the token ids: its vocabulary and rules, and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(tokenizer)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return cache.hashlib.sha256((text + special).encode()).hexdigest()


def _save_tokenizer(tokenizer, source: str | None, template: ChatTemplate, out: str) -> None:
    """The tokenizer files, with the template trained with as the chat template (``chat_template.jinja``,
    and in tokenizer_config.json for readers that look only there)."""
    os.makedirs(out)
    if source is None:
        tokenizer.save_pretrained(out)
    else:
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if os.path.exists(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    config_path = os.path.join(out, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    config["chat_template"] = template.jinja
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template.jinja)
