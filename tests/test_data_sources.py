"""Data sources and formats read with Hugging Face `datasets`: Parquet, CSV, Arrow, JSON on local disk
and on a real S3 server, Hub dataset URLs, ShareGPT / messages / text / mapped columns, and their
one-line errors."""

from __future__ import annotations

import json
from importlib import resources

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from moe_train.data import (
    DataError,
    build_packed_dataset,
    encode_conversations,
    named_template,
    pack,
    read_conversations,
    resolve_template,
)
from moe_train.data.sources import parse_hub

ASSETS = resources.files("moe_train") / "assets"
SAMPLE = str(ASSETS / "alpaca_sample.jsonl")
RECORDS = [json.loads(line) for line in open(SAMPLE)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))


def alpaca_table(records) -> pa.Table:
    """tatsu-lab/alpaca's schema: instruction, input, output, and text (the rendered prompt)."""
    return pa.table(
        {
            "instruction": [r["instruction"] for r in records],
            "input": [r.get("input", "") for r in records],
            "output": [r["output"] for r in records],
            "text": [f"Below is an instruction.\n\n### Instruction:\n{r['instruction']}" for r in records],
        }
    )


def write_alpaca_parquet(path) -> str:
    pq.write_table(alpaca_table(RECORDS), path, row_group_size=128)
    return str(path)


def assert_same_packs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_parquet_csv_arrow_and_json_of_the_same_records_give_the_same_packs(tmp_path, tokenizer):
    """The seed's alpaca as Parquet (the Hub's schema) packs exactly as the JSONL of the same records, and as
    the in-memory packer: the cache changes where packs live, not what they are."""
    parquet = write_alpaca_parquet(tmp_path / "alpaca.parquet")
    pacsv.write_csv(alpaca_table(RECORDS), tmp_path / "alpaca.csv")
    with (
        pa.OSFile(str(tmp_path / "alpaca.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, alpaca_table(RECORDS).schema) as w,
    ):
        w.write_table(alpaca_table(RECORDS))
    expected, _ = pack(encode_conversations(tokenizer, read_conversations(SAMPLE)), 256)
    for path in (SAMPLE, parquet, str(tmp_path / "alpaca.csv"), str(tmp_path / "alpaca.arrow")):
        packs, stats = build_packed_dataset(path, tokenizer, max_length=256)
        assert stats.samples == 400, path
        assert_same_packs(packs, expected)


def test_sharegpt_messages_text_and_mapped_columns(tmp_path, tokenizer):
    (tmp_path / "share.jsonl").write_text(
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi?"},
                    {"from": "gpt", "value": "Hello."},
                ]
            }
        )
        + "\n"
    )
    assert read_conversations(str(tmp_path / "share.jsonl")) == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ]
    ]
    pq.write_table(pa.table({"text": ["plain text one", "two"]}), tmp_path / "text.parquet")
    assert read_conversations(str(tmp_path / "text.parquet")) == ["plain text one", "two"]
    ids, labels = encode_conversations(tokenizer, ["plain text one"])[0]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[0] == -100 and labels[1:] == ids[1:]  # loss on every token after bos
    pq.write_table(pa.table({"question": ["2+3?"], "answer": ["5"]}), tmp_path / "qa.parquet")
    with pytest.raises(
        DataError,
        match=r"qa.parquet\[0\]: record has neither instruction/output nor messages.*"
        r"its columns: answer, question",
    ):
        read_conversations(str(tmp_path / "qa.parquet"))
    mapped = read_conversations(str(tmp_path / "qa.parquet"), columns="instruction=question,output=answer")
    assert mapped == [[{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]]
    # tatsu-lab/alpaca has a text column too: alpaca wins, unless --data-format says text
    parquet = write_alpaca_parquet(tmp_path / "alpaca.parquet")
    assert isinstance(read_conversations(parquet)[0], list)
    assert read_conversations(parquet, data_format="text")[0].startswith("Below is an instruction.")
    with pytest.raises(DataError, match=r"--data-format sharegpt needs the column\(s\) conversations; map yours"):
        read_conversations(parquet, data_format="sharegpt")


def test_tool_calls_render_with_a_template_that_has_them_or_are_refused_in_one_line(tmp_path, tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
        + "\n"
        + json.dumps(record)
        + "\n"
    )
    with pytest.raises(DataError, match=r"tools.jsonl:2: a tool call or tool result, which the deepseek_v2 template"):
        build_packed_dataset(str(path), tokenizer, max_length=256)
    jinja = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{% if m['tool_calls'] is defined %}{{ 'CALL ' + m['tool_calls'][0]['function']['name'] }}{% else %}"
        "{{ m['content'] }}{% endif %}{{ eos_token }}{% endgeneration %}{% else %}{{ m['role'] + ': ' + "
        "m['content'] + '\\n' }}{% endif %}{% endfor %}"
    )
    tokenizer.chat_template = jinja
    try:
        template = resolve_template(None, tokenizer, "deepseek_v2", "tiny")
    finally:
        tokenizer.chat_template = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer")).chat_template
    assert template.name == "tokenizer" and "tokenizer's own" in template.source
    packs, stats = build_packed_dataset(str(path), tokenizer, template=template, max_length=256)
    assert stats.samples == 2
    trained = tokenizer.decode([t for p in packs for t in p.labels.tolist() if t != -100])
    assert "CALL weather" in trained and "Sunny." in trained and "sunny" not in trained


def test_template_precedence_and_the_marker_rule(tokenizer):
    assert resolve_template("deepseek_v3", tokenizer, "deepseek_v2", "t").name == "deepseek_v3"
    # the tiny tokenizer's own template has no markers but renders as the deepseek_v2 family's
    own = resolve_template(None, tokenizer, "deepseek_v2", "t")
    assert own.name == "deepseek_v2" and "rendered with the loss spans of the deepseek_v2 template" in own.source
    with pytest.raises(DataError, match=r"has no \{% generation %\} markers.*renders differently from the deepseek_v3"):
        resolve_template(None, tokenizer, "deepseek_v3", "t")
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        named_template("chatml")


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"conversations": [{"from": "bot", "value": "x"}]}], r"x.jsonl:1: conversations\[0\] must be"),
        ([{"conversations": [{"from": "human", "value": "x"}]}], r"x.jsonl:1: conversations has no gpt turn"),
        ([{"text": ""}], r"x.jsonl:1: text must be a non-empty string"),
        ([{"text": "a"}, {"instruction": "a", "output": "b"}], r"x.jsonl:2: this alpaca record differs"),
    ],
)
def test_malformed_rows_name_file_and_row(tmp_path, records, message):
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=message) as e:
        read_conversations(str(tmp_path / "x.jsonl"))
    assert "\n" not in str(e.value)


def test_unreadable_parquet_and_mixed_types_are_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file \(.*\); fix or re-export it"):
        read_conversations(str(tmp_path / "bad.parquet"))
    pq.write_table(pa.table({"instruction": ["a", None], "output": ["b", "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls.parquet\[1\]: record has neither instruction/output"):
        read_conversations(str(tmp_path / "nulls.parquet"))
    pq.write_table(pa.table({"instruction": [1, 2], "output": ["b", "c"]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet\[0\]: alpaca instruction, input and output must be strings"):
        read_conversations(str(tmp_path / "ints.parquet"))


def test_s3_sources_on_a_real_server(s3_server, monkeypatch, tmp_path, tokenizer):
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server["storage_options"])
    fs = fsspec.filesystem("s3", **s3_server["storage_options"])
    bucket = s3_server["bucket"]
    fs.put(write_alpaca_parquet(tmp_path / "alpaca.parquet"), f"{bucket}/data/alpaca.parquet")
    fs.put(SAMPLE, f"{bucket}/data/more/sample.jsonl")
    assert len(read_conversations(f"s3://{bucket}/data")) == 800  # a directory: both files
    packs, _ = build_packed_dataset(f"s3://{bucket}/data/alpaca.parquet", tokenizer, max_length=256)
    local, _ = build_packed_dataset(SAMPLE, tokenizer, max_length=256)
    assert_same_packs(packs, local)
    with pytest.raises(DataError, match=r"s3://moe-train-test/data/nope.parquet does not exist"):
        read_conversations(f"s3://{bucket}/data/nope.parquet")


def test_hub_dataset_urls():
    src = parse_hub("hf://datasets/tatsu-lab/alpaca")
    assert (src.repo, src.revision, src.subset, src.split) == ("tatsu-lab/alpaca", None, None, "train")
    src = parse_hub("hf://datasets/allenai/tulu-3-sft-mixture@v2?subset=default&split=test")
    assert (src.repo, src.revision, src.subset, src.split) == ("allenai/tulu-3-sft-mixture", "v2", "default", "test")
    assert parse_hub("hf://datasets/tatsu-lab/alpaca/data/train.parquet") is None  # a file: read through fsspec
    with pytest.raises(DataError, match=r"unknown option 'splitt'"):
        parse_hub("hf://datasets/tatsu-lab/alpaca?splitt=x")


def test_the_hub_offline_or_unreachable_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        read_conversations("hf://datasets/tatsu-lab/alpaca")
    line = str(e.value)
    assert "\n" not in line and "hf://datasets/tatsu-lab/alpaca" in line and "HF_HUB_OFFLINE" in line
    assert "hf download tatsu-lab/alpaca --repo-type dataset --local-dir DIR" in line and "--data DIR" in line


def test_deep_json_never_reaches_pyarrow_which_would_crash(tmp_path):
    """50,000 nested arrays inside a record overflow pyarrow's C stack (a segfault, no message): such a file
    is read by Python's parser first, which refuses it with one line; brackets inside strings pass."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"instruction": "a", "output": ' + "[" * 50000 + "]" * 50000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:1: JSON nested too deeply to read"):
        read_conversations(str(deep))
    text = tmp_path / "brackets.jsonl"
    text.write_text(json.dumps({"instruction": "[" * 2000, "output": "{" * 2000}) + "\n")
    assert read_conversations(str(text))[0][1]["content"] == "{" * 2000
