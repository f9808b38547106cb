"""P3: varlen packing against padding each batch to its longest sample, on alpaca-like lengths.

Lengths: Stanford Alpaca's instruction/response pairs, rendered with a chat template and
tokenized, are mostly short with a long tail.  We draw them log-normal with a median of 150 tokens
and sigma 0.7 (mean about 190, 1% over 750), the first 40% of each sample being the masked prompt.

The whole dataset (Alpaca's 52,002 samples in the full run) is packed with
``moe_train.data.packing.pack`` into rows of at most ``max_length`` tokens; the packing efficiency
is the fraction of the packs' ``max_length`` budget holding real tokens (``PackStats.efficiency``).
Both sides then train a small DeepSeek V2 (forward + backward, fp32, CPU) for one epoch of
``steps`` steps drawn as a shuffling loader would:

- ``packed``: random packs, one row per step, attention kept inside each sample by ``cu_seqlens``;
- ``padded``: random samples in batches of B, right-padded to the longest in the batch, with B
  the mean number of samples per pack, so both sides see about as many samples.

Useful tokens/s counts real (non-pad) tokens only.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import Result, interleaved_medians, table
from moe_train.data.packing import pack
from moe_train.data.templates import IGNORE_INDEX
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM

MODES = {
    # dataset: samples packed (Stanford Alpaca has 52,002); steps: packed rows timed per epoch
    "test": dict(dataset=200, steps=4, max_length=512, hidden=64, repeats=1),
    "quick": dict(dataset=10_000, steps=16, max_length=2048, hidden=256, repeats=2),
    "full": dict(dataset=52_002, steps=48, max_length=2048, hidden=256, repeats=3),
}


def alpaca_like_samples(n: int, vocab: int, max_length: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs with alpaca-like lengths; the prompt part is masked with -100."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(150), 0.7, n)), 8, max_length).astype(int)
    samples = []
    for length in lengths.tolist():
        ids = rng.integers(2, vocab, length).tolist()
        prompt = int(length * 0.4)
        samples.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return samples


def padded_batches(samples, batch_size: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(0, len(samples), batch_size):
        group = samples[i : i + batch_size]
        longest = max(len(ids) for ids, _ in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        labels = torch.full((len(group), longest), IGNORE_INDEX, dtype=torch.long)
        for row, (s_ids, s_labels) in enumerate(group):
            ids[row, : len(s_ids)] = torch.tensor(s_ids)
            labels[row, : len(s_labels)] = torch.tensor(s_labels)
            labels[row, 0] = IGNORE_INDEX
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def bench_model(hidden: int) -> DeepseekV2ForCausalLM:
    cfg = DeepseekV2Config.from_name(
        "tiny", hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2, num_hidden_layers=2
    )
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(cfg, ExpertLayout("shard", 4)).train()  # the tiny recipe's layout


def run(mode: str = "quick") -> Result:
    m = MODES[mode]
    model = bench_model(m["hidden"])
    dataset = alpaca_like_samples(m["dataset"], model.config.vocab_size, m["max_length"])
    all_packs, stats = pack(dataset, m["max_length"], varlen=True)
    rng = np.random.default_rng(1)
    packs = [all_packs[i] for i in rng.permutation(len(all_packs))[: m["steps"]]]
    batch_size = max(1, round(stats.samples / stats.packs))
    chosen = [dataset[i] for i in rng.permutation(len(dataset))[: m["steps"] * batch_size]]
    batches = padded_batches(chosen, batch_size)
    real = {"packed": sum(len(p) for p in packs), "padded": sum(len(ids) for ids, _ in chosen)}
    padded_tokens = sum(b["input_ids"].numel() for b in batches)

    def train_packed() -> None:
        for p in packs:
            model.zero_grad(set_to_none=True)
            out = model(
                p.input_ids[None].long(),
                position_ids=p.position_ids[None].long(),
                cu_seqlens=p.cu_seqlens,
                labels=p.labels[None].long(),
            )
            (out.loss + out.aux_loss).backward()

    def train_padded() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            out = model(b["input_ids"], labels=b["labels"])
            (out.loss + out.aux_loss).backward()

    measured = interleaved_medians({"packed": train_packed, "padded": train_padded}, repeats=m["repeats"])
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = measured[clock]
    rate = {k: real[k] / t for k, t in times.items()}
    rows = [
        [
            "packed (varlen)",
            len(packs),
            len(packs) * m["max_length"],
            real["packed"] / (len(packs) * m["max_length"]),
            times["packed"],
            rate["packed"],
        ],
        [
            f"padded to longest, batch {batch_size}",
            len(batches),
            padded_tokens,
            real["padded"] / padded_tokens,
            times["padded"],
            rate["padded"],
        ],
    ]
    figures = {"p3_tokens_speedup": rate["packed"] / rate["padded"], "p3_packing_efficiency": stats.efficiency}
    notes = (
        f"dataset of {stats.samples} alpaca-like samples ({stats.tokens} tokens) packed into {stats.packs} rows "
        f"of <= {m['max_length']} tokens, {stats.efficiency:.1%} full; model: tiny DeepSeek V2 at hidden "
        f"{m['hidden']}, 2 layers; forward+backward, median of {m['repeats']} interleaved epochs, {clock} time "
        f"({torch.get_num_threads()} thread(s))."
    )
    headers = ["layout", "steps", "token slots", "non-pad fraction", f"{clock} s per epoch", "useful tokens/s"]
    targets = {"p3_tokens_speedup": (">=", 2), "p3_packing_efficiency": (">=", 0.95)}
    return Result("P3 packing vs padding", figures, table(headers, rows), notes, targets)
