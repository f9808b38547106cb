"""What a training checkpoint's JSON files must hold, and the digests that prove its bytes.

Threat model: accidental corruption and wrong edits (a disk or object store that returns other
bytes, a copy cut short, a hand edit of ``state.json``), not an attacker who can write the work dir
(who could rewrite the digests too; a key stored beside the data would add nothing).

``COMPLETE`` (written last) is a ``Manifest``: the format, step, world size, and for every file its
size and xxh3-64 digests: one per JSON or tokenizer file, and for each safetensors file one for its
header and one per entry (a rank's range of one HF tensor), so a reader checks exactly the ranges it
reads, with no second read.  ``seal`` is the digest of the rest of COMPLETE, so an edit of COMPLETE
itself is caught too.  On an object store ``etag`` keeps the store's ETag as the writer's listing
showed it (see ``TrainingCheckpoint``).  ``generation`` is the writer's lease generation and
``resumed_from`` the step its run segment started from (0: a fresh start): a checkpoint written by an
older generation past the step a newer one resumed from is a stale holder's late write (see
``CheckpointManager``; a COMPLETE without them, written before fencing, is never judged stale).

Every JSON file is read through ``parse``: one typed path from JSON to dataclasses, whose failures are
one ``ValueError`` line naming the file and the key.  A field added later (issue 25's lease
generation, a LoRA base-model reference) is a dataclass field with a default: readers of this format
ignore keys they do not know and take the default for keys an older writer did not write, so adding
one needs no format bump.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import xxhash

FORMAT = "moe-train-checkpoint/2"
OLDER_FORMATS = ("moe-train-checkpoint/1",)
DIGEST = "xxh3_64"
DIGEST_CHARS = 16  # hex characters of one digest
DAMAGED = "the checkpoint is damaged or was edited: resume from another one"


class UnsupportedFormat(ValueError):
    """A checkpoint of another moe-train version: refused, never treated as damage (not moved aside)."""


def digest(data: Any) -> str:
    """The xxh3-64 of a bytes-like object, as 16 hex characters."""
    return xxhash.xxh3_64_hexdigest(data)


def hasher() -> Any:
    return xxhash.xxh3_64()


# ------------------------------------------------------------------ one typed parse for every JSON file
def parse(tp: Any, value: Any, where: str, key: str = "") -> Any:
    """``value`` (parsed JSON) as the type ``tp``: dataclasses (keys they do not declare are ignored,
    fields with defaults may be absent), ``int`` (not bool), ``float`` (ints accepted), ``str``,
    ``bool``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]`` and ``Any``.
    Anything else is one ValueError naming ``where`` (the file) and the key."""
    shown = key or "the top level"
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str) -> ValueError:
        text = json.dumps(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return ValueError(f"{where}: {shown} is {text}, not {expected}; {DAMAGED}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a JSON object")
        hints = field_types(tp)
        out = {}
        for f in dataclasses.fields(tp):
            sub = f"{key}.{f.name}" if key else f.name
            if f.name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{where}: {sub} is missing; {DAMAGED}")
                continue
            out[f.name] = parse(hints[f.name], value[f.name], where, sub)
        return tp(**out)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            try:
                return parse(arms[0], value, where, key)
            except ValueError:
                raise bad(f"{_name(arms[0])} or null") from None
        raise TypeError(f"parse supports X | None unions only, not {tp}")
    if tp is int:
        if type(value) is not int:
            raise bad("an integer")
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise bad("a number")
        return float(value)
    if tp in (str, bool):
        if type(value) is not tp:
            raise bad(_name(tp))
        return value
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        if not isinstance(value, list):
            raise bad("a list")
        if args[0] is int and all(type(v) is int for v in value):  # the RNG files' 1,250 words
            items = value
        else:
            items = [parse(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise bad(f"a list of {len(args)}")
        return tuple(parse(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a JSON object")
        return {k: parse(args[1], v, where, f"{key}[{json.dumps(k)}]") for k, v in value.items()}
    raise TypeError(f"parse does not support {tp}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


# ------------------------------------------------------------------ COMPLETE
@dataclass(frozen=True)
class FileRecord:
    size: int
    digest: str | None = None  # the whole file (JSON and tokenizer files)
    header: str | None = None  # safetensors: the 8-byte length and the JSON header
    entries: str | None = None  # safetensors: one digest per entry, in file order, concatenated
    etag: str | None = None  # object stores: the ETag the writer's listing showed

    def entry_digests(self) -> list[str]:
        text = self.entries or ""
        return [text[i : i + DIGEST_CHARS] for i in range(0, len(text), DIGEST_CHARS)]


@dataclass(frozen=True)
class Manifest:
    format: str
    step: int
    world_size: int
    digest: str
    files: dict[str, FileRecord]
    seal: str
    generation: int = 0
    resumed_from: int = 0


def seal_of(raw: dict[str, Any]) -> str:
    """The digest of COMPLETE's content less its ``seal`` (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in raw.items() if k != "seal"}
    return digest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def manifest_json(
    step: int, world_size: int, files: dict[str, FileRecord], generation: int = 0, resumed_from: int = 0
) -> dict[str, Any]:
    """COMPLETE's content, sealed."""
    raw: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "generation": generation,
        "resumed_from": resumed_from,
        "digest": DIGEST,
        "files": {name: {k: v for k, v in dataclasses.asdict(r).items() if v is not None} for name, r in files.items()},
    }
    raw["seal"] = seal_of(raw)
    return raw


def parse_manifest(raw: Any, where: str) -> Manifest:
    """COMPLETE, checked: an older format is ``UnsupportedFormat``; damage of any kind one ValueError."""
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and "seal" not in raw and fmt in OLDER_FORMATS:
        raise UnsupportedFormat(
            f"{where} is a {fmt} checkpoint, written by an older moe-train; this version reads {FORMAT} "
            "only: resume from a newer checkpoint or start a new --work-dir (the moe-train that wrote it "
            "can still export it)"
        )
    if not isinstance(raw, dict) or not isinstance(fmt, str) or not fmt.startswith("moe-train-checkpoint/"):
        raise ValueError(
            f"{where} is not a moe-train checkpoint marker (no moe-train-checkpoint format; a DeepSpeed "
            f"checkpoint?); {DAMAGED}"
        )
    m = parse(Manifest, raw, where)
    if m.seal != seal_of(raw):
        raise ValueError(f"{where} does not match its seal (the file was changed after it was written); {DAMAGED}")
    if m.format != FORMAT:
        raise UnsupportedFormat(
            f"{where} is a {m.format} checkpoint; this version reads {FORMAT} only: use the moe-train that wrote it"
        )
    if m.digest != DIGEST:
        raise ValueError(f"{where}: digest is {m.digest!r}, not {DIGEST!r}; {DAMAGED}")
    if m.step < 0 or m.world_size < 1:
        raise ValueError(f"{where}: step {m.step} or world_size {m.world_size} out of range; {DAMAGED}")
    for name, r in m.files.items():
        tensor = name.endswith(".safetensors")
        digests = [r.header, *r.entry_digests()] if tensor else [r.digest]
        if (
            r.size < 0
            or any(d is None or len(d) != DIGEST_CHARS or d.strip("0123456789abcdef") for d in digests)
            or (tensor and (r.entries is None or len(r.entries) % DIGEST_CHARS))
        ):
            raise ValueError(f"{where}: files[{json.dumps(name)}] has no valid size and digests; {DAMAGED}")
    return m


# ------------------------------------------------------------------ state.json and the RNG files
@dataclass(frozen=True)
class LoaderState:
    epoch: int
    step: int
    num_packs: int
    dp_size: int
    micro_batch_size: int
    seed: int
    shuffle: int
    grad_accum: int


@dataclass(frozen=True)
class SchedulerState:
    last_epoch: int
    step_count: int
    base_lrs: list[float]
    last_lr: list[float]


@dataclass(frozen=True)
class DataFingerprint:
    files: list[tuple[str, int]]
    packs: int
    sha256: str


@dataclass(frozen=True)
class State:
    format: str
    step: int
    optimizer_step: int
    world_size: int
    dp_size: int
    sp: int
    grad_accum: int
    micro_batch_size: int
    loader: LoaderState
    scheduler: SchedulerState
    recipe: dict[str, Any]
    config: dict[str, Any]
    data: DataFingerprint
    buffers: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RngState:
    python: tuple[int, list[int], float | None]
    numpy: tuple[str, list[int], int, int, float]
    torch: str
    cuda: list[str] | None = None
