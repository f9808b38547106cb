"""Record formats: a source's rows -> samples (a conversation, or plain text).

=========  =====================================  ==================================================
format     columns                                sample
=========  =====================================  ==================================================
messages   ``messages``: [{role, content}, ...]   as is; roles system, user, assistant, tool (and an
                                                  assistant's ``tool_calls``), rendered by the template
sharegpt   ``conversations``: [{from, value}]     from human/user, gpt/assistant, system, tool
alpaca     ``instruction``, ``output``,           user = instruction (+ ``"\\n\\n" + input`` when
           ``input`` (optional)                   non-empty); assistant = output
text       ``text``                               the text, every token trained (continued pre-training)
=========  =====================================  ==================================================

The format is detected per source from the fields its first row has, in the order above (tatsu-lab/
alpaca's ``text`` column holds the rendered prompt: with instruction and output there it is alpaca), or
given with ``--data-format``.  ``--columns instruction=question,output=answer`` reads a field from a column of
another name.  A row of another format than its source's (a JSON Lines file that mixes them) is refused
with one line naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

from moe_train.data.sources import HINT, DataError, Sample, Source, loads, read_batches, read_text, resolve_sources

FORMATS = ("messages", "sharegpt", "alpaca", "text")
# The fields of each format, the first ones required.
FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output", "input"),
    "text": ("text",),
}
_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ALL_FIELDS = tuple(f for fields in FIELDS.values() for f in fields)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}

Where = Callable[[], str]


def parse_columns(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"instruction=question,output=answer"`` (or that dict) -> {field: column}, fields checked."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, dict) else (p.partition("=")[::2] for p in text.split(",") if p.strip())
    columns = {}
    for field, column in pairs:
        field, column = field.strip(), column.strip()
        if field not in ALL_FIELDS or not column:
            raise ValueError(
                f"--columns {text}: expected FIELD=COLUMN pairs with FIELD one of {', '.join(ALL_FIELDS)}, "
                "e.g. instruction=question,output=answer"
            )
        columns[field] = column
    return columns


def check_format(present: set[str], data_format: str, shown: str) -> str:
    """``--data-format``, its fields checked against those a source has (``present``, mapped)."""
    if data_format not in FORMATS:
        raise ValueError(f"--data-format {data_format!r} is not one of {', '.join(FORMATS)}")
    missing = [f for f in _REQUIRED[data_format] if f not in present]
    if missing:
        raise DataError(
            f"{shown}: --data-format {data_format} needs the column(s) {', '.join(missing)}; map yours with "
            f"--columns {missing[0]}=COLUMN"
        )
    return data_format


def _format_of(record: dict[str, Any]) -> str:
    """The format a single record has (its required fields not null), or ""."""
    return next((fmt for fmt in FORMATS if all(record.get(f) is not None for f in _REQUIRED[fmt])), "")


def _where(where: str | Where) -> str:
    return where if isinstance(where, str) else where()


def to_sample(record: Any, where: str | Where, fmt: str | None = None) -> Sample:
    """One record (our field names) as a sample of ``fmt`` (None: the record's own format)."""
    if not isinstance(record, dict):
        raise DataError(f"{_where(where)}: record is a {type(record).__name__}, not a JSON object; fix or remove it")
    fmt = fmt or _format_of(record)
    if not fmt or any(record.get(f) is None for f in _REQUIRED[fmt]):
        other = _format_of(record)
        if fmt and other:
            raise DataError(
                f"{_where(where)}: this {other} record differs from the source's first, which is {fmt}; keep one "
                "format per file"
            )
        raise DataError(f"{_where(where)}: record has neither instruction/output nor messages; {HINT}")
    if fmt == "messages":
        return _check_text(_messages(record["messages"], where), where)
    if fmt == "sharegpt":
        return _check_text(_sharegpt(record["conversations"], where), where)
    if fmt == "text":
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{_where(where)}: text must be a non-empty string; fix or remove the record")
        return _check_text([{"content": text}], where)[0]["content"]
    instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise DataError(f"{_where(where)}: alpaca instruction, input and output must be strings")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return _check_text([{"role": "user", "content": user}, {"role": "assistant", "content": output}], where)


def to_messages(record: Any, where: str) -> Sample:
    """A JSON record of any format as its sample (the format read from the record itself)."""
    return to_sample(record, where)


def _messages(messages: Any, where: str | Where) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{_where(where)}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m  # Arrow's nulls: absent
        ok = isinstance(m, dict) and m.get("role") in ROLES
        ok = ok and (isinstance(m.get("content"), str) or (m.get("role") == "assistant" and bool(m.get("tool_calls"))))
        if not ok:
            raise DataError(
                f'{_where(where)}: messages[{i}] must be {{"role": one of {"/".join(ROLES)}, "content": string}}'
                " (an assistant turn may hold tool_calls instead)"
            )
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"{_where(where)}: messages has no assistant turn, nothing to train; add one or remove the record"
        )
    return out


def _sharegpt(turns: Any, where: str | Where) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{_where(where)}: 'conversations' must be a non-empty list of {{from, value}} objects")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise DataError(
                f'{_where(where)}: conversations[{i}] must be {{"from": one of human/gpt/system/tool, "value": string}}'
            )
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"{_where(where)}: conversations has no gpt turn, nothing to train; add one or remove the record"
        )
    return out


def _check_text(messages: list[dict[str, Any]], where: str | Where) -> list[dict[str, Any]]:
    for i, m in enumerate(messages):
        try:
            if isinstance(m.get("content"), str):
                m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": no tokenizer can encode it
            raise DataError(
                f"{_where(where)}: messages[{i}] has a lone surrogate ({e.object[e.start]!r} at character "
                f"{e.start}), which is not text; fix or remove the record"
            ) from None
    return messages


def read_samples(
    src: Source, data_format: str | None = None, columns: dict[str, str] | None = None, batch_size: int = 1000
) -> Iterator[tuple[list[Sample], list[int]]]:
    """Batches of (samples, their row numbers) of one source."""
    columns = columns or {}
    fmt, row = None, 0
    for batch in read_batches(src, batch_size):
        n = len(next(iter(batch.values()), []))
        fields = [f for f in ALL_FIELDS if columns.get(f, f) in batch]
        if fmt is None:  # the first row's fields (precedence as in FORMATS: tatsu-lab/alpaca's text is its prompt)
            first = {f: batch[columns.get(f, f)][0] for f in fields}
            fmt = check_format(set(fields), data_format, src.shown) if data_format else _format_of(first)
            if not fmt:
                raise DataError(
                    f"{src.where(0)}: record has neither instruction/output nor messages; {HINT} "
                    f"(its columns: {', '.join(sorted(batch))})"
                )
        samples = []
        for i in range(n):
            record = {f: batch[columns.get(f, f)][i] for f in fields}
            samples.append(to_sample(record, lambda r=row + i: src.where(r), fmt))
        yield samples, list(range(row, row + n))
        row += n


def locate_json_error(src: Source) -> str | None:
    """The first problem of a JSON/JSONL file as Python's parser and the record checks see it, or None."""
    try:
        text = read_text(src)
        fmt = None
        for record, where in _records(text, src.shown):
            to_sample(record, where, fmt)
            fmt = fmt or _format_of(record)
    except DataError as e:
        return str(e)
    return None


def _records(text: str, name: str) -> Iterator[tuple[Any, str]]:
    """(record, location) of each record of a JSON-list or JSONL text."""
    if text.lstrip().startswith("["):
        for i, record in enumerate(loads(text, name, "fix the file", whole_file=True)):
            yield record, f"{name}[{i}]"
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{name}:{lineno}"
            yield loads(line, where, "fix or remove that line", whole_file=False), where


def read_conversations(
    paths: list[str] | str, data_format: str | None = None, columns: dict[str, str] | str | None = None
) -> list[Sample]:
    """Every sample of the given files, directories, globs, URLs or Hub datasets, in order."""
    columns = parse_columns(columns)
    out = [
        s for src in resolve_sources(paths) for samples, _ in read_samples(src, data_format, columns) for s in samples
    ]
    if not out:
        raise DataError(f"no samples found in {[paths] if isinstance(paths, str) else list(paths)}; {HINT}")
    return out
