"""Where training data comes from, read with Hugging Face ``datasets``, streamed: no copy of the data
goes to datasets' own cache, whose metadata would otherwise keep a URL's credentials on disk.

A ``--data`` entry is one of:

* a local path or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``hf://datasets/ORG/NAME@REV/PATH``)
  of a file, a directory (every data file below it, sorted) or a glob; a file's format comes from its
  suffix: ``.json``/``.jsonl`` (a JSON list or one record per line, whatever the suffix), ``.parquet``,
  ``.csv``, ``.arrow``;
* a Hugging Face Hub dataset, ``hf://datasets/ORG/NAME[@REVISION][?subset=NAME&split=NAME]`` (split
  ``train`` unless given).

Each file, or Hub dataset, is one *source*: its format is detected from its columns
(``moe_train/data/formats.py``), and errors name it and the row (``file:LINE`` in JSON Lines,
``file[ROW]`` otherwise).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moe_train.storage import S3_CONFIG, display, redact, resolve

Messages = list[dict[str, Any]]
Sample = Messages | str  # a conversation, or plain text (continued pre-training)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
HINT = (
    "pass --data with alpaca JSON/JSONL or chat messages JSONL, ShareGPT conversations or plain text "
    "(JSON, JSONL, Parquet, CSV or Arrow), or name the columns with --columns"
)
_HUB = re.compile(r"hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/?]+))?(?:\?(?P<query>.*))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class DataError(ValueError):
    """Bad training data; the message is one line naming the file (and row) and the fix."""


@dataclass(frozen=True)
class Source:
    """One file, or one split of a Hub dataset."""

    url: str  # as given: may carry credentials, never shown or stored
    shown: str  # redacted, for messages and records
    builder: str  # json, parquet, csv, arrow, or hub
    fs: Any = None
    path: str = ""
    repo: str = ""
    revision: str | None = None
    subset: str | None = None
    split: str = "train"

    def identity(self) -> list[Any]:
        """What names this input's content, for the cache key and the resume check: a file's size and
        modification stamp, or a Hub dataset's commit (asked of the Hub unless the revision is one)."""
        if self.builder == "hub":
            return [self.shown, hub_commit(self), self.subset, self.split]
        info = self.fs.info(self.path)
        stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_commit") if k in info), None)
        return [self.shown, int(info.get("size") or 0), str(stamp)]

    def where(self, row: int) -> str:
        """``file:LINE`` in a JSON Lines file (blank lines counted), else ``source[ROW]``."""
        if self.builder == "json":
            with self.fs.open(self.path, "rb") as f:
                head = f.read(4096).decode("utf-8-sig", errors="replace")
            if not head.lstrip().startswith("["):
                return f"{self.shown}:{_line_of(self.fs, self.path, row)}"
        return f"{self.shown}[{row}]"


def _line_of(fs: Any, path: str, row: int) -> int:
    """The line number of the ``row``-th non-blank line."""
    seen = -1
    with fs.open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return lineno
    return seen + 1


def parse_hub(url: str) -> Source | None:
    """The Hub dataset an ``hf://datasets/ORG/NAME[@REV][?subset=..&split=..]`` URL names (None for
    other URLs, including files inside a Hub repository)."""
    m = _HUB.fullmatch(url)
    if m is None:
        return None
    query = {k: v[-1] for k, v in parse_qs(m["query"] or "", keep_blank_values=True).items()}
    unknown = set(query) - {"subset", "split"}
    if unknown:
        raise DataError(
            f"{redact(url)}: unknown option {sorted(unknown)[0]!r}; a Hub dataset takes ?subset=NAME&split=NAME"
        )
    return Source(
        url=url,
        shown=redact(url),
        builder="hub",
        repo=m["repo"],
        revision=m["revision"],
        subset=query.get("subset") or None,
        split=query.get("split") or "train",
    )


def resolve_sources(paths: list[str] | str) -> list[Source]:
    """Each entry (file, directory, glob, URL or Hub dataset) as its sources, in order."""
    sources = []
    for url in [paths] if isinstance(paths, str) else paths:
        hub = parse_hub(url)
        if hub is not None:
            sources.append(hub)
            continue
        try:
            fs, path = resolve(url)
        except ValueError as e:  # unknown protocol or its package missing
            raise DataError(str(e)) from None
        try:
            if any(c in path for c in "*?["):
                found = sorted(p for p in fs.glob(path) if fs.isfile(p))
                if not found:
                    raise DataError(f"{redact(url)}: the glob matches no file; check the pattern")
            elif fs.isdir(path):
                found = sorted(p for p in fs.find(path) if _builder(p))
                if not found:
                    raise DataError(f"{redact(url)}: directory has no {', '.join(sorted(set(BUILDERS)))} file; {HINT}")
            elif fs.isfile(path):
                found = [path]
            elif fs.exists(path):  # reading a FIFO or a device would block the start-up, or never end
                raise DataError(f"{redact(url)} is not a regular file or directory (a FIFO or device?); {HINT}")
            else:
                raise DataError(f"{redact(url)} does not exist; check the path or URL given to --data")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the protocol's client raises for a network failure
            raise DataError(
                f"cannot reach {redact(url)} ({type(e).__name__}: {_first(e)}); {_reach_fix(url)}"
            ) from None
        # a file of another suffix is read as JSON (JSON Lines under any name, as before)
        sources += [Source(url, display(fs, p), _builder(p) or "json", fs, p) for p in found]
    return sources


def _builder(path: str) -> str | None:
    return BUILDERS.get(posixpath.splitext(path)[1].lower())


def _first(e: BaseException) -> str:
    return redact(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__


def _reach_fix(url: str) -> str:
    if url.startswith("hf://"):
        return (
            "check the network, HF_ENDPOINT and HF_TOKEN, or set HF_HUB_OFFLINE=1 and pass a local copy with --data DIR"
        )
    return "check the endpoint, network and credentials"


def offline_hint(src: Source) -> str:
    """The fix when the Hub cannot be reached: the offline switch, and how to pass a local copy."""
    return (
        f"download it where the Hub is reachable (hf download {src.repo} --repo-type dataset --local-dir DIR"
        + (f" --revision {src.revision}" if src.revision else "")
        + ") and pass --data DIR; HF_HUB_OFFLINE=1 keeps every Hub access off"
    )


def hub_commit(src: Source) -> str:
    """The commit a Hub dataset's revision names: asked of the Hub unless it is a commit already."""
    if src.revision and _COMMIT.fullmatch(src.revision):
        return src.revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(src.repo, revision=src.revision).sha
    except OfflineModeIsEnabled:
        raise DataError(
            f"{src.shown} is on the Hugging Face Hub but HF_HUB_OFFLINE is set; {offline_hint(src)}"
        ) from None
    except RevisionNotFoundError:
        raise DataError(f"{src.shown}: the Hub dataset has no revision {src.revision!r}; check it") from None
    except RepositoryNotFoundError:
        raise DataError(
            f"{src.shown}: no such dataset on the Hugging Face Hub (or it is private: set HF_TOKEN); check the name"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever the HTTP client raises for a network failure
        raise DataError(
            f"cannot reach the Hugging Face Hub for {src.shown} ({type(e).__name__}: {_first(e)}); {offline_hint(src)}"
        ) from None


def _open(src: Source) -> Any:
    """The source as a streamed ``datasets`` IterableDataset."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error lines would follow ours
    datasets.disable_progress_bars()
    if src.builder == "hub":
        revision = hub_commit(src)
        return datasets.load_dataset(src.repo, name=src.subset, split=src.split, revision=revision, streaming=True)
    url = src.fs.unstrip_protocol(src.path)
    options = dict(src.fs.storage_options)
    if url.startswith("s3://"):
        options.setdefault("config_kwargs", dict(S3_CONFIG))
    return datasets.load_dataset(src.builder, data_files=[url], split="train", streaming=True, storage_options=options)


def read_batches(src: Source, batch_size: int = 1000) -> Iterator[dict[str, list[Any]]]:
    """The source's rows, ``batch_size`` at a time, as columns; any way reading fails is one DataError
    (JSON is re-read with Python's parser for today's messages naming the line)."""
    if src.builder == "json" and _maybe_too_deep(src):  # pyarrow's JSON parser overflows the C stack on these
        from moe_train.data.formats import locate_json_error

        problem = locate_json_error(src)
        if problem:
            raise DataError(problem)
    try:
        for batch in _open(src).iter(batch_size=batch_size):
            yield batch
    except DataError:
        raise
    except (StopIteration, RuntimeError) as e:
        if isinstance(e, StopIteration) or isinstance(e.__cause__, StopIteration):
            return  # an empty file: datasets' stream ends with StopIteration
        raise DataError(_read_error(src, e)) from None
    except Exception as e:  # noqa: BLE001 - pyarrow, datasets and the filesystem each raise their own
        raise DataError(_read_error(src, e)) from None


MAX_DEPTH = 512  # deeper JSON is read by Python's parser first, which refuses more than ~1000 levels


def _maybe_too_deep(src: Source, chunk: int = 1 << 24) -> bool:
    """Whether the file's brackets nest deeper than MAX_DEPTH (those inside strings counted too: a
    false alarm only costs a read with Python's parser)."""
    import numpy as np

    step = np.zeros(256, dtype=np.int8)
    step[list(b"[{")], step[list(b"]}")] = 1, -1
    depth = 0
    with src.fs.open(src.path, "rb") as f:
        while block := f.read(chunk):
            running = np.cumsum(step[np.frombuffer(block, dtype=np.uint8)], dtype=np.int64) + depth
            if len(running) and running.max() > MAX_DEPTH:
                return True
            depth = int(running[-1]) if len(running) else depth
    return False


def _read_error(src: Source, e: BaseException) -> str:
    names = {f"{c.__module__}.{c.__name__}" for c in type(e).__mro__}
    if src.builder == "hub":
        if "huggingface_hub.errors.OfflineModeIsEnabled" in names:
            return f"{src.shown} is on the Hugging Face Hub but HF_HUB_OFFLINE is set; {offline_hint(src)}"
        if "datasets.exceptions.DatasetNotFoundError" in names:
            return f"{src.shown}: {_first(e)}; check the name and ?subset="
        if isinstance(e, ValueError) and "split" in str(e).lower():
            return f"{src.shown}: {_first(e)}; pass ?split=NAME"
        return (
            f"cannot read {src.shown} from the Hugging Face Hub ({type(e).__name__}: {_first(e)}); {offline_hint(src)}"
        )
    if src.builder == "json":
        from moe_train.data.formats import locate_json_error

        where = locate_json_error(src)  # the first bad line, as Python's JSON parser reads it
        if where:
            return where
    if isinstance(e, (ConnectionError, TimeoutError, OSError)) and not isinstance(e, FileNotFoundError):
        return f"cannot read {src.shown} ({type(e).__name__}: {_first(e)}); {_reach_fix(src.url)}"
    return f"{src.shown}: not a readable {src.builder} file ({type(e).__name__}: {_first(e)}); fix or re-export it"


def read_text(src: Source) -> str:
    """The whole file as text, for locating a JSON error; one DataError if it is not UTF-8."""
    with src.fs.open(src.path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{src.shown}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
        ) from None


def loads(text: str, where: str, fix: str, whole_file: bool) -> Any:
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
