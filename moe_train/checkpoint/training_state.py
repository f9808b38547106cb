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
    COMPLETE                                        written last: world size, every file and its size

Each safetensors entry is one element range of one HF tensor, named ``{hf_key}@{start}`` (1-D,
fp32): the part of that tensor inside the rank's ZeRO partition, in the HF tensor's row-major
flattening.  Keys are the HF names of the one key map (``state_dict_adapter.py``), so the files say
nothing about the world size, ZeRO's padding or how experts were stacked into shards: a rank of
any later job reads, for each range it now owns, the overlapping entries of whichever files hold
them, and ``moe-train export`` assembles whole HF tensors one at a time.  Each rank streams its own
views of DeepSpeed's flat partitions: nothing is gathered, nothing beyond one range is copied.

Trust: every file is parsed as JSON or as a safetensors header (JSON) plus raw little-endian
floats, checked against its listed size before use.  Nothing is ever unpickled, so a checkpoint
on a shared bucket cannot run code; a file that is not what it claims is one error line.
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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from fsspec.spec import AbstractBufferedFile

from moe_train.checkpoint.hf_layout import TOKENIZER_FILES, copy_files
from moe_train.checkpoint.safetensors_io import WRITE_BLOCK, PlannedTensor, header_bytes
from moe_train.models import spec_for, spec_of
from moe_train.models.common.experts import ExpertLayout
from moe_train.storage import display, is_local, resolve

FORMAT = "moe-train-checkpoint/1"
COMPLETE = "COMPLETE"
STATE = "state.json"
TOKENIZER_DIR = "tokenizer"
KINDS = ("master", "exp_avg", "exp_avg_sq")
MAX_JSON_BYTES = 64 * 2**20  # state.json holds the recipe and config: far below this
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


# ------------------------------------------------------------------ reading, checked
def read_json(fs: Any, path: str, size: int | None = None) -> Any:
    """A JSON file of at most MAX_JSON_BYTES (or exactly ``size``), as one error line if it is not JSON."""
    with fs.open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES or (size is not None and len(raw) != size):
        raise ValueError(
            f"{display(fs, path)} has {len(raw)} bytes, expected {size or 'at most ' + str(MAX_JSON_BYTES)}"
            "; the checkpoint is damaged: resume from another one"
        )
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(
            f"{display(fs, path)} is not JSON ({type(e).__name__}: {str(e)[:80]}); it is not a moe-train "
            "checkpoint file (nothing in it was run): resume from another checkpoint"
        ) from None


@dataclass(frozen=True)
class Entry:
    key: str  # HF tensor
    start: int  # first element in the HF tensor's flattening
    end: int
    file: str
    begin: int  # absolute byte offset of the entry's data in the file


def read_entries(fs: Any, path: str, name: str, size: int) -> list[Entry]:
    """The ranges held by one of our safetensors files, each checked against the file's size."""
    where = display(fs, path)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 2 <= n <= min(size - 8, MAX_JSON_BYTES):
            raise ValueError(
                f"{where} is not a safetensors file (header length {n} for a {size}-byte file); it is "
                "not a moe-train checkpoint file (nothing in it was run): resume from another checkpoint"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(
                f"{where} has no JSON safetensors header; the checkpoint is damaged (nothing in it was "
                "run): resume from another checkpoint"
            ) from None
    header.pop("__metadata__", None)
    entries, spans = [], []
    for entry, info in header.items():
        key, _, start = entry.rpartition("@")
        try:
            (length,), (lo, hi) = info["shape"], info["data_offsets"]
            ok = info["dtype"] == "F32" and start.isdigit() and hi - lo == 4 * length and 0 <= lo and 8 + n + hi <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{where}: entry {entry!r} is not a 1-D F32 range inside the file; the checkpoint is "
                "damaged or truncated: resume from another checkpoint"
            )
        entries.append(Entry(key, int(start), int(start) + length, name, 8 + n + lo))
        spans.append((lo, hi))
    spans.sort()
    if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(f"{where}: entries overlap; the checkpoint is damaged: resume from another checkpoint")
    return entries


class TrainingCheckpoint:
    """A complete checkpoint, verified: COMPLETE, every listed file present with its size, state.json.

    ``ranges(kind)`` indexes the entries of all ranks' files of one kind by HF key, checked to
    tile each HF tensor exactly; ``read(entry, start, end)`` reads elements of one entry."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/")
        self.where = display(fs, self.path)
        if not fs.exists(posixpath.join(self.path, COMPLETE)):
            raise ValueError(
                f"{self.where} is not a complete checkpoint (no {COMPLETE} inside); pass a step-N "
                "directory under <work_dir>/checkpoints or use --resume auto"
            )
        complete = read_json(fs, posixpath.join(self.path, COMPLETE))
        if not isinstance(complete, dict) or complete.get("format") != FORMAT:
            raise ValueError(
                f"{self.where}/{COMPLETE} is not a {FORMAT} marker (a DeepSpeed checkpoint of an older "
                "moe-train?); resume from a checkpoint written by this version"
            )
        self.world, self.step = int(complete["world_size"]), int(complete["step"])
        self.files: dict[str, int] = {str(k): int(v) for k, v in complete["files"].items()}
        needed = {STATE, *(f for r in range(self.world) for f in rank_files(r, self.world))}
        if needed - set(self.files):
            raise ValueError(
                f"{self.where}/{COMPLETE} does not list {sorted(needed - set(self.files))[:3]}; the "
                "checkpoint is incomplete: resume from another one"
            )
        fs.invalidate_cache(self.path)
        found = {
            posixpath.relpath(p, self.path): int(info["size"]) for p, info in fs.find(self.path, detail=True).items()
        }
        for name, size in sorted(self.files.items()):
            if found.get(name) != size:
                got = "missing" if name not in found else f"{found[name]} bytes"
                raise ValueError(
                    f"{self.where}: {name} is {got}, {COMPLETE} lists {size} bytes; the checkpoint is "
                    "truncated or was changed: resume from another one"
                )
        self.state = read_json(fs, posixpath.join(self.path, STATE), self.files[STATE])
        recipe = self.state["recipe"]  # the run's expert layout: an export then orders tensors as the run's own
        self.config = spec_for(self.state["config"].get("model_type")).config(self.state["config"])
        self.layout = ExpertLayout(recipe["moe_implementation"], recipe["expert_in_one_shard"])
        self._readers: dict[str, Any] = {}

    def rng(self, rank: int) -> dict[str, Any]:
        name = rng_file(rank, self.world)
        return read_json(self.fs, posixpath.join(self.path, name), self.files[name])

    def ranges(self, kind: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Entry]]:
        """HF key -> its entries in order, for every key of ``shapes`` (HF key -> HF shape)."""
        by_key: dict[str, list[Entry]] = {}
        for r in range(self.world):
            name = tensor_file(kind, r, self.world)
            for e in read_entries(self.fs, posixpath.join(self.path, name), name, self.files[name]):
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

    def read(self, entry: Entry, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the HF tensor from this entry (which must hold them)."""
        if entry.file not in self._readers:
            self._readers[entry.file] = self.fs.open(posixpath.join(self.path, entry.file), "rb")
        f = self._readers[entry.file]
        f.seek(entry.begin + 4 * (start - entry.start))
        data = bytearray(f.read(4 * (end - start)))
        return torch.frombuffer(data, dtype=torch.float32) if data else torch.empty(0)

    def read_into(self, entries: list[Entry], start: int, out: torch.Tensor) -> None:
        """Fill ``out`` with the HF tensor's elements [start, start + out.numel()) from ``entries``."""
        end = start + out.numel()
        for e in entries:
            lo, hi = max(start, e.start), min(end, e.end)
            if lo < hi:
                out[lo - start : hi - start].copy_(self.read(e, lo, hi))

    def load(self, owned: list[Any], cfg: Any, layout: ExpertLayout, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fill this rank's owned ranges (any world size, any expert layout) from the files that hold them.

        Pieces that are adjacent both in a file and in the destination are read with one request."""
        parts = list(hf_ranges(owned, cfg, layout))
        for kind in KINDS:
            index = self.ranges(kind, shapes)
            pieces: list[list[Any]] = []  # [file, first byte, bytes, destination view, first element]
            for key, start, end, o, offset in parts:
                dest = o.tensors[kind]
                for e in index[key]:
                    lo, hi = max(start, e.start), min(end, e.end)
                    if lo >= hi:
                        continue
                    begin, at = e.begin + 4 * (lo - e.start), offset + lo - start
                    last = pieces[-1] if pieces else None
                    if (
                        last
                        and last[0] == e.file
                        and last[1] + last[2] == begin
                        and last[3] is dest
                        and last[4] + last[2] // 4 == at
                    ):
                        last[2] += 4 * (hi - lo)
                    else:
                        pieces.append([e.file, begin, 4 * (hi - lo), dest, at])
            for file, begin, nbytes, dest, at in pieces:
                if file not in self._readers:
                    self._readers[file] = self.fs.open(posixpath.join(self.path, file), "rb")
                f = self._readers[file]
                f.seek(begin)
                data = bytearray(f.read(nbytes))
                if len(data) != nbytes:
                    raise ValueError(
                        f"{self.where}/{file} ended early; the checkpoint is truncated: resume from another one"
                    )
                dest.narrow(0, at, nbytes // 4).copy_(torch.frombuffer(data, dtype=torch.float32))
            self.close()

    def close(self) -> None:
        for f in self._readers.values():
            f.close()
        self._readers.clear()


# ------------------------------------------------------------------ which HF ranges a rank owns
def hf_ranges(owned: Iterable[Any], cfg: Any, layout: ExpertLayout) -> Iterable[tuple[str, int, int, Any, int]]:
    """(hf_key, start, end, owned range, offset in it) for every part of an HF tensor a rank owns.

    ``owned`` are ``moe_train.parallel.zero3.OwnedRange``s: a parameter's name, full shape, first
    element and 1-D views of length n."""
    for o in owned:
        for key, slot in spec_of(cfg).ours_to_hf(o.name, cfg, layout):
            s0, s1 = slot.flat_range(o.shape)
            lo, hi = max(s0, o.start), min(s1, o.start + o.n)
            if lo < hi:
                yield key, lo - s0, hi - s0, o, lo - o.start


# ------------------------------------------------------------------ the work dir's checkpoints
def _broadcast_text(text: str | None) -> str:
    """Rank 0's text on every rank (bytes in a tensor: no pickle even between our own ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return text or ""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    raw = (text or "").encode()
    n = torch.tensor([len(raw)], dtype=torch.int64, device=device)
    dist.broadcast(n, 0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and raw:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()


def _all_ok(ok: bool, sizes: list[int]) -> tuple[bool, list[list[int]]]:
    """Every rank's (ok, file sizes): the confirmation rank 0 writes COMPLETE on."""
    row = torch.tensor([int(ok), *sizes], dtype=torch.int64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok, [sizes]
    if dist.get_backend() == "nccl":
        row = row.cuda()
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    rows = [r.cpu().tolist() for r in rows]
    return all(r[0] for r in rows), [r[1:] for r in rows]


class CheckpointManager:
    """Saving, listing, verifying and resolving the checkpoints of one work dir."""

    def __init__(self, work_dir: str, rank: int, keep: int, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = resolve(work_dir, storage_options)
        self.url = work_dir.rstrip("/")
        self.root = posixpath.join(root, "checkpoints")
        self.rank, self.keep = rank, keep
        self.local = is_local(self.fs)

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

    def latest(self) -> str | None:
        complete = [path for _, path, done in self._steps() if done]
        return complete[-1] if complete else None

    def remove_incomplete(self) -> list[str]:
        """Rank 0, at start-up: partial checkpoints of a crashed run are deleted."""
        removed = [path for _, path, done in self._steps() if not done]
        for path in removed:
            self.fs.rm(path, recursive=True)
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
        """Every rank writes its ranges and RNG; rank 0 also state.json and the tokenizer, then, once
        every rank has confirmed its files and their sizes, COMPLETE.  A collective."""
        tag = f"step-{step:08d}"
        target = posixpath.join(self.root, tag)
        if self.rank == 0:
            if self.fs.exists(target):  # a leftover of an earlier run: never half-overwritten
                self._remove(target)
            self.fs.makedirs(target, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        ok, sizes, error = True, [], None
        try:
            sizes = self._write_rank(target, owned, cfg, layout, world)
            if self.rank == 0:
                self._put(posixpath.join(target, STATE), state)
                if tokenizer_dir:
                    self.fs.makedirs(posixpath.join(target, TOKENIZER_DIR), exist_ok=True)
                    copy_files(tokenizer_dir, self.fs, posixpath.join(target, TOKENIZER_DIR), TOKENIZER_FILES)
        except OSError as e:
            ok, sizes, error = False, [0] * len(rank_files(0, 1)), e
        all_ok, reported = _all_ok(ok, sizes)
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
            found = {posixpath.relpath(p, target): int(i["size"]) for p, i in self.fs.find(target, detail=True).items()}
            files = {}
            for r, rank_sizes in enumerate(reported):
                for name, size in zip(rank_files(r, world), rank_sizes):
                    if found.get(name) != size:
                        raise ValueError(
                            f"{display(self.fs, target)}: rank {r} wrote {name} with {size} bytes but "
                            f"the store shows {found.get(name)}; check the store"
                        )
                    files[name] = size
            files.update({n: s for n, s in found.items() if n == STATE or n.startswith(TOKENIZER_DIR + "/")})
            self._put(
                posixpath.join(target, COMPLETE), {"format": FORMAT, "step": step, "world_size": world, "files": files}
            )
            self._prune()
        if dist.is_initialized():
            dist.barrier()
        return target

    def _write_rank(self, target: str, owned: list[Any], cfg: Any, layout: ExpertLayout, world: int) -> list[int]:
        parts = list(hf_ranges(owned, cfg, layout))
        plan = [PlannedTensor(f"{key}@{start}", torch.float32, (end - start,)) for key, start, end, _, _ in parts]
        # The entries of one parameter follow each other in its flat partition and in the file: one
        # write per run of them (a parameter's whole range, typically) instead of one per expert.
        runs: list[list[Any]] = []
        for _, start, end, o, offset in parts:
            if runs and runs[-1][0] is o and runs[-1][2] == offset:
                runs[-1][2] = offset + end - start
            else:
                runs.append([o, offset, offset + end - start])
        sizes = []
        for kind in KINDS:
            path = posixpath.join(target, tensor_file(kind, self.rank, world))
            # Object stores upload in parts of WRITE_BLOCK: that bounds the buffer whatever the file size.
            f = self.fs.open(path, "wb", block_size=WRITE_BLOCK)
            try:
                f.write(header_bytes(plan))
                for o, lo, hi in runs:
                    view = o.tensors[kind].narrow(0, lo, hi - lo)
                    f.write(view.detach().contiguous().cpu().view(torch.uint8).numpy().data)
            except BaseException:
                if isinstance(f, AbstractBufferedFile):  # never complete the upload of a partial file
                    f.discard()
                    f.closed = True
                else:
                    f.close()
                raise
            f.close()
            self.fs.invalidate_cache(path)
            sizes.append(self.fs.size(path))
        rng_path = posixpath.join(target, rng_file(self.rank, world))
        self._put(rng_path, rng_state())
        self.fs.invalidate_cache(rng_path)
        sizes.append(self.fs.size(rng_path))
        return sizes

    def _put(self, path: str, obj: Any) -> None:
        with self.fs.open(path, "w") as f:
            json.dump(obj, f)

    def _prune(self) -> None:
        complete = [path for _, path, done in self._steps() if done]
        for path in complete[: -self.keep] if self.keep > 0 else []:
            self._remove(path)

    def _remove(self, path: str) -> None:
        marker = posixpath.join(path, COMPLETE)
        if self.fs.exists(marker):
            self.fs.rm(marker)  # first, so that a crash mid-delete leaves an incomplete checkpoint
        self.fs.rm(path, recursive=True)

    # ------------------------------------------------------------------ resume point: rank 0 decides
    def resolve(self, resume: str | None, log: Any = print) -> TrainingCheckpoint | None:
        """The checkpoint to resume from, decided by rank 0 and broadcast; every rank verifies it.

        ``auto``: the newest complete checkpoint that verifies (an older one is taken only with a
        log line saying why the newer failed), or None.  A URL: that one, or one error line.  The
        checkpoints of this work dir newer than the one resumed from are moved aside (rank 0) to
        ``checkpoints/abandoned-<UTC time>/``, so pruning and a later ``auto`` follow the new branch."""
        if not resume:
            return None
        decision: dict[str, Any] = {}
        if self.rank == 0:
            try:
                decision = self._decide(resume, log)
            except ValueError as e:
                decision = {"error": str(e)}
        decision = json.loads(_broadcast_text(json.dumps(decision)))
        if "error" in decision:
            raise ValueError(decision["error"])
        if not decision:
            return None
        fs, path = (self.fs, decision["path"]) if decision["here"] else resolve(decision["path"])
        return TrainingCheckpoint(fs, path)

    def _decide(self, resume: str, log: Any) -> dict[str, Any]:
        if resume == "auto":
            failures = []
            for step, path, done in reversed(self._steps()):
                if not done:
                    continue
                try:
                    ckpt = TrainingCheckpoint(self.fs, path)
                except ValueError as e:
                    failures.append(str(e))
                    log(f"[moe-train] {display(self.fs, path)} cannot be resumed from: {e}")
                    continue
                if failures:
                    log(f"[moe-train] falling back to {display(self.fs, path)}, the newest checkpoint that verifies")
                self._abandon_after(step, log)
                return {"path": path, "here": True, "step": ckpt.step}
            if failures:
                raise ValueError(
                    f"no checkpoint in {display(self.fs, self.root)} verifies ({failures[-1]}); "
                    "pass --resume URL of a good one, or move the checkpoints dir aside to start afresh"
                )
            return {}
        fs, path = resolve(resume)
        ckpt = TrainingCheckpoint(fs, path)
        self._abandon_after(ckpt.step, log)
        here = fs is self.fs or (is_local(fs) and self.local)
        return {"path": path if here else resume, "here": here, "step": ckpt.step}

    def _abandon_after(self, step: int, log: Any) -> None:
        newer = [path for s, path, done in self._steps() if s > step and done]  # incomplete ones: not ours to move
        if not newer:
            return
        aside = posixpath.join(self.root, "abandoned-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        self.fs.makedirs(aside, exist_ok=True)
        for path in newer:
            marker = posixpath.join(path, COMPLETE)
            if self.fs.exists(marker):
                self.fs.rm(marker)  # an interrupted move leaves nothing that looks complete
            self.fs.mv(path, posixpath.join(aside, posixpath.basename(path)), recursive=True)
            log(
                f"[moe-train] moved {display(self.fs, path)} (newer than the resumed step {step}) to "
                f"{display(self.fs, aside)}: that branch is abandoned"
            )

    def close(self) -> None:
        pass
