"""Reading training conversations from alpaca JSON/JSONL and chat-messages JSONL.

Every record becomes a list of ``{"role", "content"}`` messages.  The format is detected per record:

* alpaca: ``{"instruction", "input" (optional), "output"}`` -> user = instruction, followed by
  ``"\\n\\n" + input`` when input is non-empty; assistant = output.
* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.

A file may hold one JSON list of records or one record per line (JSONL); that is decided by its
first non-blank character, not its suffix.  Paths are local paths or any fsspec URL (``s3://``,
``memory://`` ...), and may name a directory (every ``*.json`` / ``*.jsonl`` file below it, sorted)
or a glob.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import fsspec

from moe_train.storage import display, resolve

ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".json", ".jsonl")
_HINT = "pass --data with alpaca JSON/JSONL or chat messages JSONL"

Messages = list[dict[str, str]]


class DataError(ValueError):
    """Bad training data; the message is one line naming the file (and line) and the fix."""


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return display(fs, path)  # user-info and secret query parameters redacted


def resolve_files(paths: list[str]) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """Expand each path (file, directory or glob) into (filesystem, file path) pairs, in order."""
    files = []
    for url in paths:
        try:
            fs, path = resolve(url)
        except ValueError as e:  # unknown protocol or its package missing
            raise DataError(str(e)) from None
        if any(c in path for c in "*?["):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not found:
                raise DataError(f"{url}: the glob matches no file; check the pattern")
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(DATA_SUFFIXES))
            if not found:
                raise DataError(f"{url}: directory has no .json or .jsonl file; {_HINT}")
        elif fs.exists(path):
            found = [path]
        else:
            raise DataError(f"{url} does not exist; check the path or URL given to --data")
        files += [(fs, p) for p in found]
    return files


def to_messages(record: Any, where: str) -> Messages:
    """Turn one alpaca or chat record into validated messages; ``where`` is ``file:line`` for errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, not a JSON object; fix or remove it")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f'{where}: messages[{i}] must be {{"role": one of {"/".join(ROLES)}, "content": string}}'
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: messages has no assistant turn, nothing to train; add one or remove the record")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "output" in record:
        instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            raise DataError(f"{where}: alpaca instruction, input and output must be strings")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise DataError(f"{where}: record has neither instruction/output nor messages; {_HINT}")


def _loads(text: str, where: str, fix: str, whole_file: bool) -> Any:
    """json.loads with every way it fails as one DataError naming ``where`` (and the line in a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if whole_file:
            raise DataError(f"{where}:{e.lineno}: invalid JSON ({e.msg}); {fix}") from None
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); {fix}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; {fix}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: unreadable JSON value ({str(e).splitlines()[0]}); {fix}") from None


def _check_text(messages: Messages, where: str) -> Messages:
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": no tokenizer can encode it
            raise DataError(
                f"{where}: messages[{i}] has a lone surrogate ({e.object[e.start]!r} at character "
                f"{e.start}), which is not text; fix or remove the record"
            ) from None
    return messages


def _records(text: str, name: str) -> Iterator[tuple[Any, str]]:
    """Yield (record, location) from the text of one JSON-list or JSONL file."""
    if text.lstrip().startswith("["):
        for i, record in enumerate(_loads(text, name, "fix the file", whole_file=True)):
            yield record, f"{name}[{i}]"
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        record = _loads(line, where, "fix or remove that line", whole_file=False)
        yield record, where


def read_conversations(paths: list[str] | str) -> list[Messages]:
    """All conversations of the given files, directories, globs or URLs, in file order."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    conversations = []
    for fs, path in resolve_files(paths):
        name = _display(fs, path)
        with fs.open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            msg = f"{name}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
            raise DataError(msg) from None
        conversations += [_check_text(to_messages(record, where), where) for record, where in _records(text, name)]
    if not conversations:
        raise DataError(f"no samples found in {paths}; {_HINT}")
    return conversations
