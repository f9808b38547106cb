"""Training checkpoints that do not depend on the topology and never unpickle: safetensors and JSON.

Layout of ``{work_dir}/checkpoints/step-{N:08d}/`` (world size W)::

    master-rank{r:05d}-of-{W:05d}.safetensors       fp32 master weights rank r owned
    exp_avg-rank{r:05d}-of-{W:05d}.safetensors      Adam's first moment, same ranges
    exp_avg_sq-rank{r:05d}-of-{W:05d}.safetensors   Adam's second moment, same ranges
    rng-rank{r:05d}-of-{W:05d}.json                 rank r's Python / NumPy / torch RNG states
    state.json                                      step, LR schedule, data position in packs, the
                                                    (redacted) recipe, the model's config.json, data
                                                    fingerprint, batch layout
    tokenizer/                                      the tokenizer files (``moe-train export`` needs them)
    COMPLETE                                        written last: world size, every file with its size
                                                    and digests (``manifest.py``), sealed

Each safetensors entry is one element range of one HF tensor, named ``{hf_key}@{start}`` (1-D,
fp32): the part of that tensor inside the rank's ZeRO partition, in the HF tensor's row-major
flattening.  Keys are the HF names of the one key map (``state_dict_adapter.py``), so the files say
nothing about the world size, ZeRO's padding or how experts were stacked into shards: a rank of
any later job reads, for each range it now owns, the overlapping entries of whichever files hold
them, and ``moe-train export`` assembles whole HF tensors one at a time.  Each rank streams its own
views of DeepSpeed's flat partitions: nothing is gathered, nothing beyond one range is copied.

A LoRA run's checkpoint holds the adapters only, each under its own parameter name (``...q_proj.lora_A``), a
routed expert's per expert (``...experts.{expert}.gate_up_lora_B``, (2F, R): any shard size or EP degree reads
it), and ``state.json``'s ``lora`` block says which base they belong to (its
URL and fingerprint, ``moe_train/checkpoint/adapters.py``): resume reloads the frozen base from the model.

Trust: every file is parsed as JSON or as a safetensors header (JSON) plus raw little-endian
floats, checked against its listed size and digest before use (an entry's digest as it is
streamed in: a range is read once).  Nothing is ever unpickled, so a checkpoint on a shared bucket
cannot run code; a file that is not what COMPLETE says is one error line.
"""

from __future__ import annotations

import itertools
import json
import math
import posixpath
import random
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from fsspec.spec import AbstractBufferedFile

from moe_train.checkpoint.hf_layout import TOKENIZER_FILES
from moe_train.checkpoint.manifest import (
    DAMAGED,
    FORMAT,
    FileRecord,
    RngState,
    State,
    UnsupportedFormat,
    digest,
    field_types,
    hasher,
    manifest_json,
    parse,
    parse_manifest,
)
from moe_train.checkpoint.safetensors_io import WRITE_BLOCK, PlannedTensor, header_bytes
from moe_train.models import spec_for, spec_of
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.key_map import canonical_name
from moe_train.models.common.lora import adapter_keys, is_adapter
from moe_train.recipes import Recipe
from moe_train.run_dir import RunDir
from moe_train.storage import display, is_local, redact_all, resolve

__all__ = ["FORMAT", "CheckpointManager", "TrainingCheckpoint", "UnsupportedFormat"]

COMPLETE = "COMPLETE"
STATE = "state.json"
TOKENIZER_DIR = "tokenizer"
KINDS = ("master", "exp_avg", "exp_avg_sq")
MAX_JSON_BYTES = 64 * 2**20  # state.json holds the recipe and config: far below this
MAX_COMPLETE_BYTES = 256 * 2**20  # 16 bytes per entry: ~16M entries (DeepSeek V2 236B on 1,000+ ranks)
CHUNK = 4 * 2**20  # entries are read, checked and copied in pieces of this size: one small buffer
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Recipe fields that define the run: a change on resume is refused (the model and data are checked apart).
FIXED = ("template", "max_length", "varlen", "too_long", "shuffle", "seed", "epochs", "warmup_ratio", "min_lr_ratio")
# Recipe fields that may change on resume; applied from the resumed step and logged.
TUNABLE = ("lr", "betas", "weight_decay", "max_grad_norm", "max_steps", "save_steps", "save_total_limit")
# How the same run is laid out: re-partitioned on resume (the global batch is checked apart).
LAYOUT = (
    "moe_implementation",
    "expert_in_one_shard",
    "sp",
    "grad_accum",
    "micro_batch_size",
    "deepspeed",
    "dtype",
    "activation_checkpointing",
    "ep",
)
# What state.json's recipe must hold, with the types of the Recipe fields: what resume and export read.
RECIPE_KEYS = ("name", "moe_implementation", "expert_in_one_shard", *FIXED, *TUNABLE)


def tensor_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world:05d}.safetensors"


def rng_file(rank: int, world: int) -> str:
    return f"rng-rank{rank:05d}-of-{world:05d}.json"


def rank_files(rank: int, world: int) -> list[str]:
    return [tensor_file(kind, rank, world) for kind in KINDS] + [rng_file(rank, world)]


# ------------------------------------------------------------------ RNG as JSON
def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in state["cuda"]])


def check_rng(raw: Any, where: str) -> dict[str, Any]:
    """An RNG file's content, typed and in range (what ``set_rng_state`` takes without an error)."""
    s = parse(RngState, raw, where)
    words = [*s.python[1], *s.numpy[1]]
    torch_bytes = torch.get_rng_state().numel()
    if (
        len(s.python[1]) != 625
        or len(s.numpy[1]) != 624
        or not all(0 <= w < 2**32 for w in words)
        or not 0 <= s.numpy[2] <= 624
        or s.numpy[0] != "MT19937"
        or len(s.torch) != 2 * torch_bytes
        or s.torch.strip("0123456789abcdef")
    ):
        raise ValueError(f"{where} does not hold Python, NumPy and torch generator states; {DAMAGED}")
    return raw


def check_state(raw: Any, where: str) -> dict[str, Any]:
    """state.json's content, typed: every key resume and export read, and the recipe's fields they compare."""
    s = parse(State, raw, where)
    if s.format != FORMAT:
        raise ValueError(f"{where}: format is {s.format!r}, not {FORMAT!r}; {DAMAGED}")
    hints = field_types(Recipe)
    for key in RECIPE_KEYS:
        if key not in s.recipe:
            raise ValueError(f"{where}: recipe.{key} is missing; {DAMAGED}")
        parse(hints[key], s.recipe[key], where, f"recipe.{key}")
    return raw


# ------------------------------------------------------------------ reading, checked
def _loads(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"{where} is not JSON ({type(e).__name__}: {str(e)[:80]}); it is not a moe-train checkpoint file "
            "(nothing in it was run): resume from another checkpoint"
        ) from None


def _read_exactly(f: Any, view: memoryview) -> int:
    """Fill ``view`` from ``f``; fewer bytes only at the end of the file."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


@dataclass(frozen=True, eq=False)  # each entry is one object: hashed by identity, cheaply
class Entry:
    key: str  # HF tensor
    start: int  # first element in the HF tensor's flattening
    end: int
    file: str
    begin: int  # absolute byte offset of the entry's data in the file
    digest: str | None  # None: the store vouches for the file (ETag unchanged)


def read_entries(fs: Any, path: str, name: str, record: FileRecord, checked: bool) -> list[Entry]:
    """The ranges held by one of our safetensors files, the header checked against its digest (when
    ``checked``), each entry against the file's size; each entry gets its digest from ``record``."""
    where = display(fs, path)
    size = record.size
    with fs.open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 2 <= n <= min(size - 8, MAX_JSON_BYTES):
            raise ValueError(
                f"{where} is not a safetensors file (header length {n} for a {size}-byte file); it is "
                "not a moe-train checkpoint file (nothing in it was run): resume from another checkpoint"
            )
        raw = f.read(n)
    if checked and digest(head + raw) != record.header:
        raise ValueError(f"{where}: the safetensors header does not match its digest in {COMPLETE}; {DAMAGED}")
    header = _loads(raw, f"{where}'s safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the safetensors header is not a JSON object; {DAMAGED}")
    header.pop("__metadata__", None)
    found = []
    for entry, info in header.items():
        key, _, start = entry.rpartition("@")
        try:
            (length,), (lo, hi) = info["shape"], info["data_offsets"]
            ok = (
                info["dtype"] == "F32"
                and start.isdigit()
                and all(type(v) is int for v in (length, lo, hi))
                and hi - lo == 4 * length
                and 0 <= lo
                and 8 + n + hi <= size
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{where}: entry {entry!r} is not a 1-D F32 range inside the file; the checkpoint is "
                "damaged or truncated: resume from another checkpoint"
            )
        found.append((lo, hi, key, int(start), length))
    found.sort()
    if any(a[1] > b[0] for a, b in itertools.pairwise(found)):
        raise ValueError(f"{where}: entries overlap; the checkpoint is damaged: resume from another checkpoint")
    digests = record.entry_digests()
    if checked and len(digests) != len(found):
        raise ValueError(f"{where}: {len(found)} entries but {COMPLETE} lists {len(digests)} digests; {DAMAGED}")
    return [
        Entry(key, start, start + length, name, 8 + n + lo, digests[i] if checked else None)
        for i, (lo, _, key, start, length) in enumerate(found)
    ]


class TrainingCheckpoint:
    """A complete checkpoint, verified: COMPLETE (sealed), every listed file present with its size,
    state.json (digest and schema).

    ``ranges(kind)`` indexes the entries of all ranks' files of one kind by HF key, each header
    checked against its digest, and checked to tile each HF tensor exactly; ``load`` and
    ``read_into`` stream entries whole and check each one's digest as it is read.

    On an object store, a file whose ETag is the one the writer recorded is the object the writer
    uploaded, and the store's own checksums cover it (S3: Content-MD5/CRC32 on upload, its ETag an
    MD5 of the object or of its parts): such a file (``vouched``) is read without hashing.  Any
    other file (copied to the store by another tool, replaced, edited) is checked by its digests."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/")
        self.where = display(fs, self.path)
        marker = posixpath.join(self.path, COMPLETE)
        if not fs.exists(marker):
            raise ValueError(
                f"{self.where} is not a complete checkpoint (no {COMPLETE} inside); pass a step-N "
                "directory under <work_dir>/checkpoints or use --resume auto"
            )
        with fs.open(marker, "rb") as f:
            raw = f.read(MAX_COMPLETE_BYTES + 1)
        if len(raw) > MAX_COMPLETE_BYTES:
            raise ValueError(f"{self.where}/{COMPLETE} is over {MAX_COMPLETE_BYTES} bytes; {DAMAGED}")
        self.manifest = parse_manifest(_loads(raw, f"{self.where}/{COMPLETE}"), f"{self.where}/{COMPLETE}")
        self.world, self.step = self.manifest.world_size, self.manifest.step
        self.files: dict[str, FileRecord] = self.manifest.files
        needed = {STATE, *(f for r in range(self.world) for f in rank_files(r, self.world))}
        if needed - set(self.files):
            raise ValueError(
                f"{self.where}/{COMPLETE} does not list {sorted(needed - set(self.files))[:3]}; the "
                "checkpoint is incomplete: resume from another one"
            )
        fs.invalidate_cache(self.path)
        found = {posixpath.relpath(p, self.path): info for p, info in fs.find(self.path, detail=True).items()}
        for name, record in sorted(self.files.items()):
            size = found[name]["size"] if name in found else None
            if size != record.size:
                got = "missing" if name not in found else f"{size} bytes"
                raise ValueError(
                    f"{self.where}: {name} is {got}, {COMPLETE} lists {record.size} bytes; the checkpoint is "
                    "truncated or was changed: resume from another one"
                )
        self.vouched = {n for n, r in self.files.items() if r.etag is not None and found[n].get("ETag") == r.etag}
        self.state = check_state(self.read_json(STATE), f"{self.where}/{STATE}")
        if (self.state["step"], self.state["world_size"]) != (self.step, self.world):
            raise ValueError(
                f"{self.where}/{STATE} is of step {self.state['step']} on {self.state['world_size']} ranks, "
                f"{COMPLETE} of step {self.step} on {self.world}; {DAMAGED}"
            )
        recipe = self.state["recipe"]  # the run's expert layout: an export then orders tensors as the run's own
        try:
            self.config = spec_for(self.state["config"].get("model_type")).config(self.state["config"])
            self.layout = ExpertLayout(recipe["moe_implementation"], recipe["expert_in_one_shard"])
        except (ValueError, TypeError) as e:  # TypeError: a field the config class does not take
            raise ValueError(f"{self.where}/{STATE}: config: {str(e).splitlines()[0]}; {DAMAGED}") from None
        self._readers: dict[str, Any] = {}
        self._buffer = bytearray(CHUNK)

    # ------------------------------------------------------------------ whole files
    def read_file(self, name: str) -> bytes:
        """A listed file's bytes, checked against its size and digest."""
        record, where = self.files[name], f"{self.where}/{name}"
        if record.size > MAX_JSON_BYTES:
            raise ValueError(f"{where}: {record.size} bytes, over {MAX_JSON_BYTES}; {DAMAGED}")
        with self.fs.open(posixpath.join(self.path, name), "rb") as f:
            raw = f.read(record.size + 1)
        if len(raw) != record.size:
            raise ValueError(
                f"{where} has {len(raw)} bytes, {COMPLETE} lists {record.size}; the checkpoint is truncated "
                "or was changed: resume from another one"
            )
        if name not in self.vouched and digest(raw) != record.digest:
            raise ValueError(f"{where} does not match its digest in {COMPLETE}; {DAMAGED}")
        return raw

    def read_json(self, name: str) -> Any:
        return _loads(self.read_file(name), f"{self.where}/{name}")

    def rng(self, rank: int) -> dict[str, Any]:
        name = rng_file(rank, self.world)
        return check_rng(self.read_json(name), f"{self.where}/{name}")

    # ------------------------------------------------------------------ tensor ranges
    def ranges(self, kind: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Entry]]:
        """HF key -> its entries in order, for every key of ``shapes`` (HF key -> HF shape)."""
        by_key: dict[str, list[Entry]] = {}
        for r in range(self.world):
            name = tensor_file(kind, r, self.world)
            path = posixpath.join(self.path, name)
            for e in read_entries(self.fs, path, name, self.files[name], name not in self.vouched):
                by_key.setdefault(e.key, []).append(e)
        extra = sorted(set(by_key) - set(shapes))
        if extra:
            raise ValueError(
                f"{self.where}: {kind} holds {extra[:3]}, which the model does not have; the checkpoint "
                "belongs to another model"
            )
        for key, shape in shapes.items():
            entries = sorted(by_key.get(key, []), key=lambda e: e.start)
            pos = 0
            for e in entries:
                if e.start != pos:
                    break
                pos = e.end
            if pos != math.prod(shape) or len(entries) != len({e.start for e in entries}):
                raise ValueError(
                    f"{self.where}: {kind} ranges of {key} do not cover its {math.prod(shape)} elements "
                    "exactly; the checkpoint is damaged: resume from another one"
                )
            by_key[key] = entries
        return by_key

    def _stream(self, file: str, wanted: dict[Entry, list[tuple[int, int, torch.Tensor, int]]]) -> None:
        """Read every entry of ``wanted`` (all in ``file``) whole, check its digest, and copy its elements
        [lo, hi) to ``dest[at:]`` for each (lo, hi, dest, at) of it.

        Entries that follow each other in the file are read with one request into one CHUNK buffer and
        checked before anything is copied, the copies merged where the destination is contiguous too
        (a parameter's entries, typically).  An entry above CHUNK is streamed in CHUNK pieces, each
        copied as it comes: when its digest then fails, the caller discards the destination (a failed
        resume falls back and loads all of another checkpoint).  A range is read once."""
        if file not in self._readers:
            self._readers[file] = self.fs.open(posixpath.join(self.path, file), "rb")
        f = self._readers[file]
        batch: list[Entry] = []
        for e in sorted(wanted, key=lambda e: e.begin):
            if batch and (
                e.begin != batch[-1].begin + 4 * (batch[-1].end - batch[-1].start)
                or e.begin + 4 * (e.end - e.start) - batch[0].begin > CHUNK
            ):
                self._read_batch(f, file, batch, wanted)
                batch = []
            if 4 * (e.end - e.start) > CHUNK:
                self._read_large(f, file, e, wanted[e])
            else:
                batch.append(e)
        if batch:
            self._read_batch(f, file, batch, wanted)

    def _read_at(self, f: Any, file: str, begin: int, view: memoryview) -> None:
        if f.tell() != begin:
            f.seek(begin)
        if _read_exactly(f, view) != len(view):
            raise ValueError(f"{self.where}/{file} ended early; the checkpoint is truncated: resume from another one")

    def _damaged(self, file: str, e: Entry) -> ValueError:
        return ValueError(
            f"{self.where}/{file}: the range {e.key}@{e.start} ({e.end - e.start} values) does not match its "
            f"digest in {COMPLETE}; {DAMAGED}"
        )

    def _read_batch(self, f: Any, file: str, batch: list[Entry], wanted: dict[Entry, list[Any]]) -> None:
        begin = batch[0].begin
        view = memoryview(self._buffer)[: batch[-1].begin + 4 * (batch[-1].end - batch[-1].start) - begin]
        self._read_at(f, file, begin, view)
        values = torch.frombuffer(self._buffer, dtype=torch.float32, count=len(view) // 4)
        copies: list[list[Any]] = []  # [destination, at, first value in the buffer, count]
        for e in batch:
            first = (e.begin - begin) // 4
            if e.digest is not None and digest(view[4 * first : 4 * (first + e.end - e.start)]) != e.digest:
                raise self._damaged(file, e)
            for lo, hi, dest, at in wanted[e]:
                src, n = first + lo - e.start, hi - lo
                last = copies[-1] if copies else None
                if last and last[0] is dest and last[1] + last[3] == at and last[2] + last[3] == src:
                    last[3] += n
                else:
                    copies.append([dest, at, src, n])
        for dest, at, src, n in copies:
            dest.narrow(0, at, n).copy_(values[src : src + n])

    def _read_large(self, f: Any, file: str, e: Entry, wanted: list[Any]) -> None:
        h = hasher() if e.digest is not None else None
        first = e.start
        while first < e.end:
            n = min(CHUNK // 4, e.end - first)
            view = memoryview(self._buffer)[: 4 * n]
            self._read_at(f, file, e.begin + 4 * (first - e.start), view)
            if h is not None:
                h.update(view)
            values = torch.frombuffer(self._buffer, dtype=torch.float32, count=n)
            for lo, hi, dest, at in wanted:
                a, b = max(lo, first), min(hi, first + n)
                if a < b:
                    dest.narrow(0, at + a - lo, b - a).copy_(values[a - first : b - first])
            first += n
        if h is not None and h.hexdigest() != e.digest:
            raise self._damaged(file, e)

    def read_into(self, entries: list[Entry], start: int, out: torch.Tensor) -> None:
        """Fill ``out`` with the HF tensor's elements [start, start + out.numel()) from ``entries``."""
        end = start + out.numel()
        by_file: dict[str, dict[Entry, list[Any]]] = {}
        for e in entries:
            lo, hi = max(start, e.start), min(end, e.end)
            if lo < hi:
                by_file.setdefault(e.file, {})[e] = [(lo, hi, out, lo - start)]
        for file, wanted in by_file.items():
            self._stream(file, wanted)

    def load(self, owned: list[Any], cfg: Any, layout: ExpertLayout, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fill this rank's owned ranges (any world size, any expert layout) from the files that hold them.

        Every entry that overlaps an owned range is read whole and checked: on the same layout that
        is exactly the rank's own entries; on another one, parts of the entries at range boundaries
        are read and dropped."""
        parts = list(hf_ranges(owned, cfg, layout))
        for kind in KINDS:
            index = self.ranges(kind, shapes)
            by_file: dict[str, dict[Entry, list[Any]]] = {}
            for key, start, end, o, offset in parts:
                dest = o.tensors[kind]
                for e in index[key]:
                    lo, hi = max(start, e.start), min(end, e.end)
                    if lo < hi:
                        by_file.setdefault(e.file, {}).setdefault(e, []).append((lo, hi, dest, offset + lo - start))
            for file, wanted in by_file.items():
                self._stream(file, wanted)
            self.close()

    def close(self) -> None:
        for f in self._readers.values():
            f.close()
        self._readers.clear()


# ------------------------------------------------------------------ which HF ranges a rank owns
def hf_ranges(owned: Iterable[Any], cfg: Any, layout: ExpertLayout) -> Iterable[tuple[str, int, int, Any, int]]:
    """(hf_key, start, end, owned range, offset in it) for every part of an HF tensor a rank owns.

    ``owned`` are ``moe_train.parallel.zero3.OwnedRange``s: a parameter's name, full shape, first
    element and 1-D views of length n.  A LoRA adapter is keyed by its own name, a routed expert's per expert
    (``adapter_keys``)."""
    for o in owned:
        if is_adapter(o.name):  # a LoRA run's only trained parameters
            slots = adapter_keys(canonical_name(o.name), layout.shard_size(cfg.num_experts))
        else:
            slots = spec_of(cfg).ours_to_hf(o.name, cfg, layout)
        for key, slot in slots:
            s0, s1 = slot.flat_range(o.shape)
            lo, hi = max(s0, o.start), min(s1, o.start + o.n)
            if lo < hi:
                yield key, lo - s0, hi - s0, o, lo - o.start


# ------------------------------------------------------------------ collectives: tensors, never pickle
def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast_text(text: str | None, src: int = 0) -> str:
    """Rank ``src``'s text on every rank."""
    if not _distributed():
        return text or ""
    device = _device()
    raw = (text or "").encode() if dist.get_rank() == src else b""
    n = torch.tensor([len(raw)], dtype=torch.int64, device=device)
    dist.broadcast(n, src)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if raw:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes().decode()


def _all_gather_ints(row: list[int]) -> list[list[int]]:
    """Every rank's row of ints (rows of one length), on every rank."""
    if not _distributed():
        return [row]
    t = torch.tensor(row, dtype=torch.int64, device=_device())
    rows = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, t)
    return [r.cpu().tolist() for r in rows]


def _all_ok(ok: bool, sizes: list[int]) -> tuple[bool, list[list[int]]]:
    """Every rank's (ok, file sizes): the confirmation rank 0 writes COMPLETE on."""
    rows = _all_gather_ints([int(ok), *sizes])
    return all(r[0] for r in rows), [r[1:] for r in rows]


def _gather_ints(row: list[int]) -> list[list[int]]:
    """Every rank's row of ints (rows of any length) on rank 0; [] on the others."""
    if not _distributed():
        return [row]
    device = _device()
    n = torch.tensor([len(row)], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    t = torch.zeros(int(n.item()) + 1, dtype=torch.int64)
    t[0] = len(row)
    t[1 : 1 + len(row)] = torch.tensor(row, dtype=torch.int64)
    t = t.to(device)
    rows = [torch.zeros_like(t) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(t, rows, dst=0)
    return [r.cpu().tolist()[1 : 1 + int(r[0])] for r in rows] if rows is not None else []


def first_error(error: str | None) -> str | None:
    """None when no rank failed, else the lowest failing rank's error, on every rank (a collective)."""
    failed = [r for r, (ok,) in enumerate(_all_gather_ints([int(error is None)])) if not ok]
    return _broadcast_text(error, src=failed[0]) if failed else None


def _encode(digests: list[list[str]]) -> list[int]:
    """Digest lists as int64s (count, digests... for each list): how a rank sends them to rank 0."""
    out = []
    for ds in digests:
        out.append(len(ds))
        out += [(v - 2**64 if v >= 2**63 else v) for v in (int(d, 16) for d in ds)]
    return out


def _decode(row: list[int]) -> list[list[str]]:
    out, i = [], 0
    while i < len(row):
        n = row[i]
        out.append([f"{v % 2**64:016x}" for v in row[i + 1 : i + 1 + n]])
        i += 1 + n
    return out


def _record(name: str, size: int, digests: list[str], info: dict[str, Any]) -> FileRecord:
    etag = info.get("ETag")  # s3fs's listing; local files have none
    if name.endswith(".safetensors"):
        return FileRecord(size, header=digests[0], entries="".join(digests[1:]), etag=etag)
    return FileRecord(size, digest=digests[0], etag=etag)


# ------------------------------------------------------------------ the work dir's checkpoints
class CheckpointManager:
    """Saving, listing, verifying and resolving the checkpoints of one work dir (``run.checkpoints``);
    every write goes through the run directory.

    One branch: COMPLETE carries the writer's lease generation and the step its run resumed from.  A
    checkpoint of an older generation past the step a newer generation resumed from was written by a
    stale holder after the takeover (paused between its lease check and its write): resume, pruning
    and ``latest`` ignore it, and ``--resume auto`` moves it to ``checkpoints/stale-<UTC time>/``."""

    def __init__(self, run: RunDir, rank: int, keep: int) -> None:
        self.run, self.fs, self.root = run, run.fs, run.checkpoints
        self.rank, self.keep = rank, keep
        self.local = is_local(self.fs)
        self.resumed_from = 0  # the step this run segment started from (setup sets it on resume)

    # ------------------------------------------------------------------ listing
    def _steps(self) -> list[tuple[int, str, bool]]:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        out = []
        for path in self.fs.ls(self.root, detail=False):
            m = _STEP_DIR.match(posixpath.basename(path.rstrip("/")))
            if m:
                out.append((int(m.group(1)), path, self.fs.exists(posixpath.join(path, COMPLETE))))
        return sorted(out)

    def _stamps(self, path: str) -> tuple[int, int] | None:
        """(generation, resumed_from) from a checkpoint's COMPLETE; None when unreadable or unstamped (an
        older moe-train's): never judged stale, verification names the damage or the format."""
        try:
            raw = json.loads(self.fs.cat_file(posixpath.join(path, COMPLETE)))
            stamps = raw["generation"], raw["resumed_from"]
        except (ValueError, TypeError, KeyError, OSError):
            return None
        return stamps if all(type(v) is int for v in stamps) else None

    def _branch(self) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
        """The complete checkpoints (step, path) of the current branch, and the stale ones, each with why."""
        complete = [(step, path, self._stamps(path)) for step, path, done in self._steps() if done]
        stamped = [stamps for _, _, stamps in complete if stamps is not None]
        branch, stale = [], []
        for step, path, stamps in complete:
            newer = [(g, f) for g, f in stamped if stamps is not None and g > stamps[0] and f < step]
            if newer:
                g, f = max(newer)
                why = f"written by lease generation {stamps[0]} after generation {g} resumed from step {f}"
                stale.append((path, why))
            else:
                branch.append((step, path))
        return branch, stale

    def latest(self) -> str | None:
        branch, _ = self._branch()
        return branch[-1][1] if branch else None

    def remove_incomplete(self) -> list[str]:
        """Rank 0, at start-up: partial checkpoints of a crashed run are deleted."""
        removed = [path for _, path, done in self._steps() if not done]
        for path in removed:
            self.run.remove(path, recursive=True)
        return removed

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        owned: list[Any],
        cfg: Any,
        layout: ExpertLayout,
        state: dict[str, Any],
        tokenizer_dir: str | None,
        world: int,
    ) -> str:
        """Every rank writes its ranges and RNG, digesting what it writes; rank 0 also state.json and the
        tokenizer, then, once every rank has confirmed its files, their sizes and digests, COMPLETE.
        A collective."""
        tag = f"step-{step:08d}"
        target = posixpath.join(self.root, tag)
        if self.rank == 0:
            self.run.check_owner()  # a holder that lost the lease stops here, before any file
            if self.fs.exists(target):  # a leftover of an earlier run: never half-overwritten
                self._remove(target)
            self.run.makedirs(target)
        if dist.is_initialized():
            dist.barrier()
        names = rank_files(self.rank, world)
        written: dict[str, tuple[int, list[str]]] = {}
        rank0: dict[str, tuple[int, str]] = {}
        error = None
        try:
            written = self._write_rank(target, owned, cfg, layout, world)
            if self.rank == 0:
                rank0[STATE] = self._put(posixpath.join(target, STATE), redact_all(state))
                if tokenizer_dir:
                    rank0.update(self._copy_tokenizer(tokenizer_dir, target))
        except OSError as e:
            error = e
        ok = error is None
        all_ok, reported = _all_ok(ok, [written[n][0] for n in names] if ok else [0] * len(names))
        digests = _gather_ints(_encode([written[n][1] for n in names]) if ok else [])
        if not all_ok:
            if error is not None and error.errno is not None:
                raise error  # this rank's own failure (a full disk, a lost store): the CLI names it in one line
            raise ValueError(
                f"saving {display(self.fs, target)} failed on "
                f"{'this rank' if error else 'another rank'} ({error or 'see its log'}); free space or "
                "fix the store, then resume from the previous checkpoint"
            ) from error
        if self.rank == 0:
            self.fs.invalidate_cache(target)
            found = {posixpath.relpath(p, target): i for p, i in self.fs.find(target, detail=True).items()}
            files = {}
            listed = [
                (name, size, ds)
                for r, (sizes, row) in enumerate(zip(reported, digests))
                for name, size, ds in zip(rank_files(r, world), sizes, _decode(row))
            ]
            listed += [(name, size, [d]) for name, (size, d) in rank0.items()]
            for name, size, ds in listed:
                if name not in found or found[name]["size"] != size:
                    raise ValueError(
                        f"{display(self.fs, target)}: {name} was written with {size} bytes but the store "
                        f"shows {found[name]['size'] if name in found else 'no such file'}; check the store"
                    )
                files[name] = _record(name, size, ds, found[name])
            self.run.check_owner()
            complete = manifest_json(step, world, files, self.run.generation, self.resumed_from)
            # Created exclusively (target was emptied above): a stale holder's late COMPLETE never replaces
            # the one a newer owner wrote for the same step.
            self._put(posixpath.join(target, COMPLETE), complete, mode="xb")
            self._prune()
        if dist.is_initialized():
            dist.barrier()
        return target

    def _write_rank(
        self, target: str, owned: list[Any], cfg: Any, layout: ExpertLayout, world: int
    ) -> dict[str, tuple[int, list[str]]]:
        """This rank's files: name -> (size on the store, digests: a safetensors file's header and
        entries, a JSON file's bytes)."""
        parts = list(hf_ranges(owned, cfg, layout))
        plan = [PlannedTensor(f"{key}@{start}", torch.float32, (end - start,)) for key, start, end, _, _ in parts]
        # The entries of one parameter follow each other in its flat partition and in the file: one
        # write per run of them (a parameter's whole range, typically) instead of one per expert.
        runs: list[list[Any]] = []  # [owned range, first element, end, entry lengths]
        for _, start, end, o, offset in parts:
            if runs and runs[-1][0] is o and runs[-1][2] == offset:
                runs[-1][2] = offset + end - start
                runs[-1][3].append(end - start)
            else:
                runs.append([o, offset, offset + end - start, [end - start]])
        out = {}
        for kind in KINDS:
            name = tensor_file(kind, self.rank, world)
            path = posixpath.join(target, name)
            header = header_bytes(plan)
            digests = [digest(header)]
            # Object stores upload in parts of WRITE_BLOCK: that bounds the buffer whatever the file size.
            f = self.run.open(path, "wb", block_size=WRITE_BLOCK)
            try:
                f.write(header)
                for o, lo, hi, lengths in runs:
                    data = o.tensors[kind].narrow(0, lo, hi - lo).detach().contiguous().cpu().view(torch.uint8).numpy()
                    f.write(data.data)
                    for first, n in zip(itertools.accumulate([0, *lengths]), lengths):
                        digests.append(digest(data[4 * first : 4 * (first + n)]))
            except BaseException:
                if isinstance(f, AbstractBufferedFile):  # never complete the upload of a partial file
                    f.discard()
                    f.closed = True
                else:
                    f.close()
                raise
            f.close()
            self.fs.invalidate_cache(path)
            out[name] = (self.fs.size(path), digests)
        name = rng_file(self.rank, world)
        _, rng_digest = self._put(posixpath.join(target, name), rng_state())
        self.fs.invalidate_cache(posixpath.join(target, name))
        out[name] = (self.fs.size(posixpath.join(target, name)), [rng_digest])
        return out

    def _put(self, path: str, obj: Any, mode: str = "wb") -> tuple[int, str]:
        raw = json.dumps(obj).encode()
        with self.run.open(path, mode) as f:
            f.write(raw)
        return len(raw), digest(raw)

    def _copy_tokenizer(self, tokenizer_dir: str, target: str) -> dict[str, tuple[int, str]]:
        src_fs, src_root = resolve(tokenizer_dir)
        self.run.makedirs(posixpath.join(target, TOKENIZER_DIR))
        out = {}
        for name in TOKENIZER_FILES:
            if src_fs.exists(posixpath.join(src_root, name)):
                data = src_fs.cat_file(posixpath.join(src_root, name))
                with self.run.open(posixpath.join(target, TOKENIZER_DIR, name), "wb") as f:
                    f.write(data)
                out[f"{TOKENIZER_DIR}/{name}"] = (len(data), digest(data))
        return out

    def _prune(self) -> None:
        complete = [path for _, path in self._branch()[0]]
        for path in complete[: -self.keep] if self.keep > 0 else []:
            self._remove(path)

    def _remove(self, path: str) -> None:
        marker = posixpath.join(path, COMPLETE)
        if self.fs.exists(marker):
            self.run.remove(marker)  # first, so that a crash mid-delete leaves an incomplete checkpoint
        self.run.remove(path, recursive=True)

    # ------------------------------------------------------------------ resume point: rank 0 decides
    def resolve(self, resume: str | None, log: Any = print) -> TrainingCheckpoint | None:
        """The checkpoint to resume from, decided by rank 0 and broadcast; every rank verifies it.

        ``auto``: the newest complete checkpoint that verifies, or None; the newer ones that do not
        verify are moved to ``checkpoints/damaged-<UTC time>/``, one log line each saying why.  A
        URL: that one, or one error line.  The checkpoints of this work dir newer than the one
        resumed from are moved aside (rank 0) to ``checkpoints/abandoned-<UTC time>/``, so pruning and
        a later ``auto`` follow the new branch."""
        if not resume:
            return None
        return self._agree(lambda: self._decide(resume, log))

    def fall_back(self, failed: TrainingCheckpoint, reason: str, auto: bool, log: Any = print) -> TrainingCheckpoint:
        """After ``failed`` did not verify while a rank loaded it (``reason``, the same on every rank):
        with ``--resume auto`` it is moved aside and the newest intact one is returned (a collective);
        else, or when none is left, one error line."""
        if not auto:
            raise ValueError(reason)
        ckpt = self._agree(lambda: self._decide("auto", log, damaged=[(failed.path, reason)]))
        assert ckpt is not None  # _decide raises when nothing verifies
        return ckpt

    def _agree(self, decide: Callable[[], dict[str, Any]]) -> TrainingCheckpoint | None:
        decision: dict[str, Any] = {}
        if self.rank == 0:
            try:
                decision = decide()
            except ValueError as e:
                decision = {"error": str(e), "format": isinstance(e, UnsupportedFormat)}
        decision = json.loads(_broadcast_text(json.dumps(decision)))
        if "error" in decision:
            raise (UnsupportedFormat if decision["format"] else ValueError)(decision["error"])
        if not decision:
            return None
        fs, path = (self.fs, decision["path"]) if decision["here"] else resolve(decision["path"])
        return TrainingCheckpoint(fs, path)

    def _decide(self, resume: str, log: Any, damaged: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        if resume == "auto":
            damaged = list(damaged or [])
            branch, stale = self._branch()
            for path, why in stale:
                self._move_aside(path, "stale", log, why)
            for step, path in reversed(branch):
                if path in {p for p, _ in damaged}:
                    continue
                try:
                    ckpt = TrainingCheckpoint(self.fs, path)
                except UnsupportedFormat:
                    raise
                except ValueError as e:
                    damaged.append((path, str(e)))
                    continue
                for bad, why in damaged:
                    self._move_aside(bad, "damaged", log, why)
                self._abandon_after(step, log)
                return {"path": path, "here": True, "step": ckpt.step}
            if damaged:  # nothing moved: an operator decides what to keep
                raise ValueError(
                    f"no checkpoint in {display(self.fs, self.root)} verifies ({damaged[0][1]}); "
                    "pass --resume URL of a good one, or move the checkpoints dir aside to start afresh"
                )
            return {}
        fs, path = resolve(resume)
        ckpt = TrainingCheckpoint(fs, path)
        self._abandon_after(ckpt.step, log)
        here = fs is self.fs or (is_local(fs) and self.local)
        return {"path": path if here else resume, "here": here, "step": ckpt.step}

    def _abandon_after(self, step: int, log: Any) -> None:
        for s, path, done in self._steps():
            if s > step and done:  # incomplete ones: not ours to move
                why = f"newer than the resumed step {step}: that branch is abandoned"
                self._move_aside(path, "abandoned", log, why)

    def _move_aside(self, path: str, why: str, log: Any, reason: str) -> None:
        """Move a checkpoint into ``checkpoints/{why}-<UTC time>/``, with one log line.  An abandoned one
        loses COMPLETE first (an interrupted move must not leave an intact checkpoint of the old branch);
        a damaged one keeps it, for inspection (it fails verification wherever it is)."""
        aside = posixpath.join(self.root, f"{why}-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        self.run.makedirs(aside)
        marker = posixpath.join(path, COMPLETE)
        if why == "abandoned" and self.fs.exists(marker):
            self.run.remove(marker)
        self.run.move(path, posixpath.join(aside, posixpath.basename(path)))
        log(f"[moe-train] moved {display(self.fs, path)} to {display(self.fs, aside)}: {reason}")

    def close(self) -> None:
        pass
