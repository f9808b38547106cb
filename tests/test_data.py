"""The data pipeline: reading, chat template, packing, the distributed loader, the shipped assets."""

from __future__ import annotations

import json
from importlib import resources

import fsspec
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from moe_train.data import (
    IGNORE_INDEX,
    DataError,
    PackedLoader,
    build_packed_dataset,
    encode_conversations,
    encode_messages,
    pack,
    read_conversations,
)

ASSETS = resources.files("moe_train") / "assets"
SAMPLE = str(ASSETS / "alpaca_sample.jsonl")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "Reverse the order of the words.\n\nred apple sky"},
    {"role": "assistant", "content": "sky apple red"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def sample(n, trained=True, token=5):
    """A fake tokenized sample of n tokens: bos, then trained (or prompt-only) tokens."""
    ids = [0] + [token] * (n - 1)
    return ids, [IGNORE_INDEX] + ([token] * (n - 1) if trained else [IGNORE_INDEX] * (n - 1))


# --- shipped assets and template ---------------------------------------------------------------


def test_shipped_tokenizer(tokenizer):
    assert len(tokenizer) == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, EOS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    # Like DeepSeek V2's tokenizer: encode() prepends bos, never appends eos.
    ids = tokenizer.encode("hello world")
    assert ids[0] == 0 and 0 not in ids[1:] and 1 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


def test_chat_template_renders_what_encode_messages_builds(tokenizer):
    conversations = [CHAT, CHAT[1:3], *read_conversations(SAMPLE)[:50]]
    for messages, (ids, _) in zip(conversations, encode_conversations(tokenizer, conversations)):
        rendered = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert list(rendered) == ids
    text = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == f"{BOS}You answer briefly.\n\nUser: What is 2 + 3?\n\nAssistant:"


def test_template_trains_only_assistant_replies(tokenizer):
    ids, labels = encode_messages(tokenizer, CHAT)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels))
    # Split the trained tokens into runs, one per assistant turn.
    runs, run = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            run.append(lab)
        elif run:
            runs, run = runs + [run], []
    # The generation prompt ends at "Assistant:", so the space before the reply is the model's to emit.
    assert [tokenizer.decode(r) for r in runs] == [" 2 + 3 = 5." + EOS, " sky apple red" + EOS]
    prompt = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert (
        prompt == f"{BOS}You answer briefly.\n\nUser: What is 2 + 3?\n\nAssistant:User: Reverse the order "
        "of the words.\n\nred apple sky\n\nAssistant:"
    )


def test_alpaca_records_become_messages_and_a_mixed_file_is_refused(tmp_path):
    records = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
    ]
    convs = read_conversations(write_jsonl(tmp_path / "a.jsonl", records))
    assert convs[0] == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert convs[1][0] == {"role": "user", "content": "Say hi."}
    assert convs[2][1] == {"role": "assistant", "content": "bye"}
    assert read_conversations(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])) == [CHAT]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*records, {"messages": CHAT}])
    with pytest.raises(
        DataError,
        match=r"mixed.jsonl:4: this messages record differs from the source's first, which "
        r"is alpaca; keep one format per file",
    ):
        read_conversations(mixed)


# --- sources -----------------------------------------------------------------------------------


def test_json_list_directory_glob_and_memory_url(tmp_path):
    records = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(3)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "list.json").write_text(json.dumps(records, indent=2))
    write_jsonl(tmp_path / "d" / "more.jsonl", [{"messages": CHAT}])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    assert len(read_conversations(str(tmp_path / "d" / "list.json"))) == 3
    assert len(read_conversations(str(tmp_path / "d"))) == 4
    assert len(read_conversations(str(tmp_path / "d" / "*.jsonl"))) == 1
    with fsspec.open("memory://bucket/chat.jsonl", "w") as f:
        f.write(json.dumps({"messages": CHAT}) + "\n")
    assert read_conversations(["memory://bucket/chat.jsonl"]) == [CHAT]
    (tmp_path / "d" / "list.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(DataError, match=r"list.json:3: invalid JSON \(Expecting value\); fix the file"):
        read_conversations(str(tmp_path / "d"))


@pytest.mark.parametrize(
    "lines, expected",
    [
        (
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output" "b"}'],
            r"bad.jsonl:2: invalid JSON \(Expecting ':' delimiter at column 31\); fix or remove that line",
        ),
        (
            ['{"instruction": "a", "output": "b"}', "", '{"prompt": "a"}'],
            r"bad.jsonl:3: record has neither instruction/output nor messages; pass --data with",
        ),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], r"bad.jsonl:1: messages\[0\] must be"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], r"bad.jsonl:1: messages has no assistant turn"),
        ([""], r"no samples found in \[.*bad.jsonl'\]; pass --data with alpaca JSON/JSONL or chat messages JSONL"),
    ],
    ids=["invalid-json", "unknown-record", "bad-role", "no-assistant", "empty-file"],
)
def test_bad_input_errors_are_one_line(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=expected) as e:
        read_conversations(str(path))
    assert "\n" not in str(e.value)


def test_missing_path_error(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl does not exist; check the path") as e:
        read_conversations([str(tmp_path / "nope.jsonl")])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"the glob matches no file"):
        read_conversations(str(tmp_path / "*.jsonl"))


# --- packing -----------------------------------------------------------------------------------


def test_pack_boundaries_varlen_and_classic():
    samples = [sample(3), sample(2), sample(4)]
    (p,), stats = pack(samples, max_length=9)
    assert p.cu_seqlens.tolist() == [0, 3, 5, 9] and p.cu_seqlens.dtype == torch.int32
    assert p.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert p.labels.tolist() == [-100, 5, 5, -100, 5, -100, 5, 5, 5]
    assert (stats.samples, stats.packs, stats.tokens, stats.efficiency) == (3, 1, 9, 1.0)
    (p,), _ = pack(samples, max_length=9, varlen=False)
    assert p.cu_seqlens.tolist() == [0, 9]
    assert p.position_ids.tolist() == list(range(9))
    assert p.labels.tolist() == [-100, 5, 5, -100, 5, -100, 5, 5, 5]  # the loss still stays in a sample


def test_samples_are_never_split_and_packing_is_deterministic():
    rng = np.random.default_rng(0)
    samples = [sample(int(n), token=i + 2) for i, n in enumerate(rng.integers(2, 100, size=300))]
    packs, stats = pack(samples, max_length=128, seed=3)
    pieces = []
    for p in packs:
        assert len(p) <= 128
        cu = p.cu_seqlens.tolist()
        pieces += [tuple(p.input_ids[a:b].tolist()) for a, b in zip(cu, cu[1:])]
    assert sorted(pieces) == sorted(tuple(ids) for ids, _ in samples)
    again, _ = pack(samples, max_length=128, seed=3)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(packs, again))


def test_packing_efficiency(tokenizer):
    packs, stats = build_packed_dataset(SAMPLE, tokenizer, max_length=256)
    assert stats.efficiency >= 0.95, str(stats)
    assert stats.tokens == sum(len(p) for p in packs)
    # An alpaca-like length mix (log-normal, median ~150 tokens) at the alpaca recipes' 2048.
    lengths = np.clip(np.random.default_rng(0).lognormal(5.0, 0.8, size=5000), 20, 1500).astype(int)
    _, stats = pack([sample(int(n)) for n in lengths], max_length=2048)
    assert stats.efficiency >= 0.95, str(stats)


def test_too_long_policy_is_counted():
    samples = [sample(5), sample(12), sample(12, trained=False), sample(3)]
    packs, stats = pack(samples, max_length=8, too_long="truncate")
    assert (stats.samples, stats.truncated, stats.dropped) == (3, 1, 1)  # the prompt-only cut is dropped
    assert max(len(p) for p in packs) == 8
    _, stats = pack(samples, max_length=8, too_long="drop")
    assert (stats.samples, stats.truncated, stats.dropped) == (2, 0, 2)
    with pytest.raises(ValueError, match="too_long must be one of"):
        pack(samples, max_length=8, too_long="split")


def test_shipped_sample_exercises_truncation(tokenizer):
    _, stats = build_packed_dataset(SAMPLE, tokenizer, max_length=256)
    assert stats.truncated > 0 and stats.samples == 400


def test_empty_result_is_a_data_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "x " * 300, "output": "y"}])
    with pytest.raises(DataError, match="produced no trainable samples"):
        build_packed_dataset(path, tokenizer, max_length=64, too_long="drop")


# --- loader ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packs():
    rng = np.random.default_rng(1)
    packs, _ = pack([sample(int(n), token=i + 2) for i, n in enumerate(rng.integers(4, 60, size=200))], 64)
    return packs


def test_batch_layout(packs):
    batch = next(iter(PackedLoader(packs, seed=0)))
    L = batch["input_ids"].shape[1]
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (1, L) and batch[key].dtype == torch.long
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"][-1] == L
    assert batch["num_loss_tokens"] == int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    cu = batch["cu_seqlens"]
    assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())


def test_micro_batch_of_two_packs(packs):
    loader = PackedLoader(packs, micro_batch_size=2, pad_id=1, shuffle=False)
    batch = next(iter(loader))
    a, b = packs[0], packs[1]
    assert batch["input_ids"][0].tolist() == a.input_ids.tolist() + b.input_ids.tolist()
    assert batch["cu_seqlens"].tolist() == a.cu_seqlens.tolist() + (b.cu_seqlens[1:] + len(a)).tolist()
    assert batch["num_loss_tokens"] == int((a.labels[1:] != IGNORE_INDEX).sum() + (b.labels[1:] != IGNORE_INDEX).sum())
    assert len(loader) == -(-len(packs) // 2)


def test_ranks_get_disjoint_packs_and_equal_steps(packs):
    seen = []
    for rank in range(2):
        loader = PackedLoader(packs, dp_rank=rank, dp_size=2, seed=7)
        batches = list(loader)
        assert len(batches) == len(loader) == -(-len(packs) // 2)
        seen.append({tuple(b["input_ids"][0].tolist()) for b in batches if b["num_packs"]})
        assert loader.epoch == 1 and loader.step == 0
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == len(packs)


def _trained_samples(batch) -> list[int]:
    """The samples of a micro-batch built by `sample(n, token=id)`: one id per trained segment."""
    ids, labels, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seqlens"].tolist()
    return [int(ids[e - 1]) for s, e in zip(cu[:-1], cu[1:]) if (labels[s:e] != IGNORE_INDEX).any()]


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_every_sample_is_trained_exactly_once_per_epoch(micro_batch_size):
    """2 ranks, grad_accum 3, a pack count that divides by neither: the last step takes the leftover
    packs, ranks without one get dummies, and every rank runs the same number of micro-batches."""
    samples = [sample(20, token=i + 2) for i in range(61)]
    packs, _ = pack(samples, 64)  # 3 samples per pack
    assert len(packs) % (2 * 3 * micro_batch_size) != 0
    loaders = [
        PackedLoader(packs, dp_rank=r, dp_size=2, seed=3, grad_accum=3, micro_batch_size=micro_batch_size, pad_id=1)
        for r in range(2)
    ]
    steps = -(-len(packs) // (2 * 3 * micro_batch_size))
    for epoch in range(2):
        trained, dummies = [], 0
        per_rank = [list(loader) for loader in loaders]
        assert [len(b) for b in per_rank] == [steps * 3, steps * 3]
        for batches in per_rank:
            for b in batches:
                trained += _trained_samples(b)
                if b["num_packs"] == 0:
                    dummies += 1
                    assert b["num_loss_tokens"] == 0 and b["input_ids"].shape == (1, 1)
                    assert b["labels"].eq(IGNORE_INDEX).all()
            assert all(b["num_packs"] > 0 for b in batches[:-3])  # dummies only in the last step
        assert sorted(trained) == list(range(2, 63)), f"epoch {epoch}"
        assert dummies >= 1 and sum(b["num_packs"] for batches in per_rank for b in batches) == len(packs)
        assert all(loader.epoch == epoch + 1 and loader.step == 0 for loader in loaders)


def test_epochs_reshuffle_and_resume_is_exact(packs):
    def ids(batches):
        return [b["input_ids"][0].tolist() for b in batches]

    full = PackedLoader(packs, seed=5)
    epoch0, epoch1 = ids(full), ids(full)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)

    first = PackedLoader(packs, seed=5)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    resumed = PackedLoader(packs, seed=5)
    resumed.load_state_dict(state)
    assert ids(head) + ids(resumed) == epoch0
    assert ids(resumed) == epoch1  # the next epoch follows as in an uninterrupted run

    with pytest.raises(ValueError, match="saved with dp_size=1 but now has 2"):
        PackedLoader(packs, dp_size=2, seed=5).load_state_dict(state)


def test_fewer_packs_than_ranks_still_train_each_pack_once(packs):
    loaders = [PackedLoader(packs[:3], dp_rank=r, dp_size=8) for r in range(8)]
    batches = [b for loader in loaders for b in loader]
    assert len(batches) == 8 and sum(b["num_packs"] for b in batches) == 3
    with pytest.raises(DataError, match="no packs"):
        PackedLoader([], dp_rank=0, dp_size=8)
