"""The data of a run: the tokenizer, the packed training set split from its validation packs, and this
rank's loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_train.engine.log import log
from moe_train.engine.tokenizer import check_tokenizer, load_tokenizer, local_tokenizer_dir
from moe_train.models import spec_for, spec_of
from moe_train.parallel.dims import ParallelDims
from moe_train.recipes import Recipe
from moe_train.storage import redact


@dataclass(kw_only=True)
class Data:
    loader: Any  # PackedLoader of this rank's training packs
    tokenizer_dir: str
    pad_id: int
    steps_per_epoch: int
    eval_loader: Any = None  # validation packs (--eval-data / eval_fraction), or None


def build_data(r: Recipe, dims: ParallelDims, cfg: Any = None, cache_dir: str | None = None) -> Data:
    """Tokenizer (checked against ``cfg``), chat template, packed dataset (tokenized once into the cache
    under ``cache_dir`` and memory-mapped; moe_train/data/cache.py) and this rank's loader."""
    from moe_train.data import PackedLoader, build_packed_dataset, resolve_template

    rank = dims.rank

    tokenizer_dir = local_tokenizer_dir(r, r.model)
    tokenizer = load_tokenizer(tokenizer_dir, r.tokenizer or r.model)
    if cfg is not None:
        check_tokenizer(cfg, tokenizer, r.tokenizer or r.model)
    log(rank, f"tokenizer: {redact(r.tokenizer or r.model)} ({len(tokenizer)} tokens)")
    if not r.data:
        raise ValueError(f"recipe {r.name} has no data; pass --data PATH|URL (alpaca JSON/JSONL or messages JSONL)")
    family = (spec_of(cfg) if cfg is not None else spec_for(r.family)).chat_template
    template = resolve_template(r.template, tokenizer, family, redact(r.tokenizer or r.model))
    log(rank, f"chat template: {template.source}")
    options = dict(
        template=template,
        max_length=r.max_length,
        varlen=r.varlen,
        too_long=r.too_long,
        seed=r.seed,
        data_format=r.data_format,
        columns=r.columns,
        cache_dir=cache_dir,
        tokenizer_dir=tokenizer_dir,
        log=lambda m: log(rank, m),
    )
    packs, stats = build_packed_dataset(r.data, tokenizer, **options)
    pad_id = tokenizer.pad_token_id or 0
    dp = dims.dp
    eval_packs = None
    if r.eval_data:
        eval_packs, eval_stats = build_packed_dataset(r.eval_data, tokenizer, **options)
        log(rank, f"eval data: {eval_stats}")
    elif r.eval_fraction > 0:
        if not 0 < r.eval_fraction < 1 or len(packs) < 2:
            raise ValueError(
                f"eval_fraction={r.eval_fraction} must be in (0, 1) with at least 2 packs; "
                "pass --eval-fraction 0.05 or --eval-data PATH"
            )
        held = sorted(
            np.random.default_rng([r.seed, 1])
            .permutation(len(packs))[: max(1, round(r.eval_fraction * len(packs)))]
            .tolist()
        )
        keep = set(held)
        eval_packs = packs.select(held)
        packs = packs.select([i for i in range(len(packs)) if i not in keep])
        log(rank, f"eval data: {len(eval_packs)} of the packs held out (eval_fraction={r.eval_fraction})")
    eval_loader = None
    if eval_packs:  # every rank runs the same number of eval forwards (dummies where packs run out)
        eval_loader = PackedLoader(
            eval_packs,
            dp_rank=dims.dp_rank,
            dp_size=dp,
            shuffle=False,
            micro_batch_size=r.micro_batch_size,
            pad_id=pad_id,
        )
    loader = PackedLoader(
        packs,
        dp_rank=dims.dp_rank,
        dp_size=dp,
        seed=r.seed,
        shuffle=r.shuffle,
        micro_batch_size=r.micro_batch_size,
        pad_id=pad_id,
        grad_accum=r.grad_accum,
    )
    log(rank, f"data: {stats}")
    log(
        rank,
        f"data: {len(packs)} packs, {loader.steps_per_epoch} steps per epoch, {r.grad_accum} micro-batches "
        f"per step on each of {dp} data-parallel ranks ({r.micro_batch_size} packs each); every pack once "
        "per epoch"
        + (
            f", the last step's {loader.dummies_per_epoch} empty pack slots run as dummies"
            if loader.dummies_per_epoch
            else ""
        ),
    )
    # checkpoints and the export copy the tokenizer files as trained: with the chat template used
    return Data(
        loader=loader,
        tokenizer_dir=packs.tokenizer_dir,
        pad_id=pad_id,
        steps_per_epoch=loader.steps_per_epoch,
        eval_loader=eval_loader,
    )
