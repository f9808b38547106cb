"""Tokenize once, share by memory map: the packed dataset as an Arrow file, keyed by its inputs.

An entry ``{root}/{key}/`` holds

* ``packs.arrow``: an Arrow IPC file, one row per pack: ``input_ids`` and ``labels`` (int32 lists),
  ``cu_seqlens`` (int32 list), ``digest`` (SHA-256 of the pack, for the resume check);
* ``tokenizer/``: the tokenizer files with the chat template trained with (``chat_template.jinja``),
  which checkpoints and the export copy;
* ``meta.json``: what went in (inputs redacted) and the packing figures;
* ``COMPLETE``, written last, after which the entry never changes.

The key is a SHA-256 of what decides the packs: each input's identity (a file's size and modification
stamp, a Hub dataset's commit), the tokenizer files' bytes, the template's text, the format options,
``max_length``, ``varlen``, ``too_long`` and the packing seed.  A requeued or resumed job finds its entry
and only maps it; a changed input gets a new entry.

Who builds (``open_or_build``): every rank writes a probe file into ``root``; a rank waits for the
lowest rank whose probe it sees.  On a shared file system that is global rank 0, alone; on node-local
storage, the lowest rank of each node.  Waiting ranks poll the file system, outside any collective,
so a long tokenization cannot time out the process group; a builder that fails leaves its one-line
error for them, and one that stops beating its heartbeat file is reported after ``STALE_S``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from moe_train.data.packing import Pack, PackStats, check_options, keep, plan_packs, positions
from moe_train.data.sources import DataError
from moe_train.storage import redact

FORMAT = 1  # bump when the entry's layout or the packing changes
COMPLETE = "COMPLETE"
PACKS = "packs.arrow"
META = "meta.json"
TOKENIZER = "tokenizer"
STALE_S = 120.0  # a builder whose heartbeat has not moved for this long is taken as gone
_BEAT_S = 5.0
_BATCH = 1024  # packs (or samples) per Arrow record batch


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[
        :32
    ]


def file_digest(paths: Iterable[str]) -> str:
    """SHA-256 over the bytes of those of ``paths`` that exist, with their names."""
    h = hashlib.sha256()
    for path in sorted(paths):
        if os.path.exists(path):
            h.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def complete(entry: str) -> bool:
    return os.path.exists(os.path.join(entry, COMPLETE))


# --- writing ------------------------------------------------------------------------------------


def _list_array(pieces: Sequence[np.ndarray]) -> Any:
    import pyarrow as pa

    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32, copy=False)))


def pack_digest(input_ids: np.ndarray, labels: np.ndarray, cu_seqlens: np.ndarray) -> bytes:
    h = hashlib.sha256()
    for t in (input_ids, labels, cu_seqlens):
        h.update(np.ascontiguousarray(t, dtype=np.int32).tobytes())
        h.update(b"|")
    return h.digest()


def write_packs(
    entry: str,
    samples: Iterable[tuple[list[int], list[int]]],
    max_length: int,
    varlen: bool,
    too_long: str,
    seed: int,
) -> PackStats:
    """Pack ``samples`` (streamed) into ``entry/packs.arrow``; memory holds one batch and the lengths.

    The kept samples go to a scratch Arrow file first, so the packs can gather them in any order by
    memory map; the packs are those ``moe_train.data.packing.pack`` builds from the same samples."""
    import pyarrow as pa

    check_options(max_length, too_long)
    scratch = os.path.join(entry, "samples.arrow")
    schema = pa.schema([("input_ids", pa.large_list(pa.int32())), ("labels", pa.large_list(pa.int32()))])
    lengths, truncated, dropped = [], 0, 0
    with pa.OSFile(scratch, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        ids_batch, labels_batch = [], []

        def flush() -> None:
            if ids_batch:
                writer.write_batch(pa.record_batch([_list_array(ids_batch), _list_array(labels_batch)], schema=schema))
                ids_batch.clear()
                labels_batch.clear()

        for sample in samples:
            s, cut = keep(sample, max_length, too_long)
            if s is None:
                dropped += 1
                continue
            truncated += cut
            ids_batch.append(np.asarray(s[0], dtype=np.int32))
            labels_batch.append(np.asarray(s[1], dtype=np.int32))
            lengths.append(len(s[0]))
            if len(ids_batch) == _BATCH:
                flush()
        flush()
    n_tokens = np.asarray(lengths, dtype=np.int64)
    bins = plan_packs(n_tokens, max_length, seed)
    kept = _Mapped(scratch)
    schema = pa.schema(
        [
            ("input_ids", pa.large_list(pa.int32())),
            ("labels", pa.large_list(pa.int32())),
            ("cu_seqlens", pa.large_list(pa.int32())),
            ("digest", pa.binary(32)),
        ]
    )
    with pa.OSFile(os.path.join(entry, PACKS), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for first in range(0, len(bins), _BATCH):
            cols: list[list[Any]] = [[], [], [], []]
            for b in bins[first : first + _BATCH]:
                ids = np.concatenate([kept.row("input_ids", j) for j in b])
                labels = np.concatenate([kept.row("labels", j) for j in b])
                sizes = n_tokens[b]
                cu = np.zeros(len(b) + 1 if varlen else 2, dtype=np.int32)
                cu[1:] = np.cumsum(sizes) if varlen else sizes.sum()
                for col, value in zip(cols, (ids, labels, cu, pack_digest(ids, labels, cu))):
                    col.append(value)
            arrays = [_list_array(c) for c in cols[:3]] + [pa.array(cols[3], type=pa.binary(32))]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
    del kept
    os.remove(scratch)
    return PackStats(
        samples=len(lengths),
        packs=len(bins),
        tokens=int(n_tokens.sum()),
        truncated=truncated,
        dropped=dropped,
        max_length=max_length,
    )


# --- reading ------------------------------------------------------------------------------------


class _Mapped:
    """The list columns of an Arrow IPC file, memory-mapped: rows as zero-copy numpy views."""

    def __init__(self, path: str) -> None:
        import pyarrow as pa

        reader = pa.ipc.open_file(pa.memory_map(path, "r"))
        self.schema = reader.schema
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in batches])
        self.columns: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for name in reader.schema.names:
            if name == "digest":
                self.digests = (
                    np.concatenate(
                        [np.frombuffer(b.column(name).buffers()[1], dtype=np.uint8)[: 32 * b.num_rows] for b in batches]
                    ).reshape(-1, 32)
                    if batches
                    else np.zeros((0, 32), dtype=np.uint8)
                )
                continue
            self.columns[name] = [
                (b.column(name).offsets.to_numpy(), b.column(name).values.to_numpy(zero_copy_only=True))
                for b in batches
            ]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row(self, name: str, i: int) -> np.ndarray:
        b = int(np.searchsorted(self.starts, i, side="right")) - 1
        offsets, values = self.columns[name][b]
        j = i - self.starts[b]
        return values[offsets[j] : offsets[j + 1]]


class PackedDataset:
    """The packs of a cache entry, memory-mapped (or a selection of them): a sequence of ``Pack``."""

    def __init__(self, entry: str, index: np.ndarray | None = None, _mapped: _Mapped | None = None) -> None:
        self.entry = entry
        self._map = _mapped or _Mapped(os.path.join(entry, PACKS))
        self.index = np.arange(len(self._map)) if index is None else np.asarray(index, dtype=np.int64)
        with open(os.path.join(entry, META)) as f:
            self.meta = json.load(f)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Pack:
        k = int(self.index[i])
        cu = torch.from_numpy(self._map.row("cu_seqlens", k).copy())
        return Pack(
            torch.from_numpy(self._map.row("input_ids", k).copy()),
            torch.from_numpy(self._map.row("labels", k).copy()),
            positions(cu),
            cu,
        )

    def __iter__(self) -> Iterator[Pack]:
        return (self[i] for i in range(len(self)))

    def select(self, index: Sequence[int]) -> "PackedDataset":
        return PackedDataset(self.entry, self.index[np.asarray(index, dtype=np.int64)], self._map)

    @property
    def stats(self) -> PackStats:
        return PackStats(**self.meta["stats"])

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.entry, TOKENIZER)

    def sha256(self) -> str:
        """SHA-256 over the digests of these packs, in order (what a checkpoint records of its data)."""
        return hashlib.sha256(self._map.digests[self.index].tobytes()).hexdigest()


# --- one builder, every rank reads --------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _builder(root: str) -> tuple[int, str]:
    """(the rank this one waits for, this attempt's id): the lowest rank whose probe it sees."""
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return rank, uuid.uuid4().hex
    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    attempt = box[0]
    probes = os.path.join(root, f".probe-{attempt}")
    os.makedirs(probes, exist_ok=True)
    open(os.path.join(probes, str(rank)), "w").close()
    dist.barrier()
    builder = min(int(name) for name in os.listdir(probes))
    dist.barrier()  # every rank has listed the probes before they go
    if rank == builder:
        shutil.rmtree(probes, ignore_errors=True)
    return builder, attempt


class _Heartbeat:
    """Touches ``path`` every few seconds while the build runs."""

    def __init__(self, path: str) -> None:
        self.path, self._stop = path, threading.Event()
        open(path, "w").close()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(_BEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            os.remove(self.path)
        except OSError:
            pass


def open_or_build(root: str, key: str, build: Callable[[str], None], log: Callable[[str], None]) -> str:
    """The complete entry ``root/key``, built by ``build(directory)`` once (see the module docstring)."""
    entry = os.path.join(root, key)
    if complete(entry):
        return entry
    os.makedirs(root, exist_ok=True)
    builder, attempt = _builder(root)
    rank, _ = _rank_world()
    failed = os.path.join(root, f".{key}.failed-{attempt}")
    beat = os.path.join(root, f".{key}.building-{attempt}")
    if rank != builder:
        _wait(entry, failed, beat, builder)
        return entry
    if complete(entry):  # another job built it meanwhile
        return entry
    _sweep(root, key)
    heartbeat = _Heartbeat(beat)
    tmp = os.path.join(root, f".{key}.tmp-{attempt}")
    try:
        os.makedirs(tmp)
        build(tmp)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write("{}")
        try:
            os.rename(tmp, entry)
        except OSError:  # a concurrent job's entry is there: the same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _rank_world()[1] > 1:  # the waiting ranks stop with the same line
            try:
                with open(failed, "w") as f:
                    f.write(redact(str(e).splitlines()[0] if isinstance(e, ValueError) and str(e) else repr(e)))
            except OSError:
                pass  # a full disk: they see the heartbeat stop
        raise
    finally:
        heartbeat.close()
    return entry


def _sweep(root: str, key: str) -> None:
    """Remove what earlier builders of ``key`` left (killed ones: a partial entry and a still heartbeat)."""
    for name in os.listdir(root):
        if name.startswith(f".{key}.failed-"):
            os.remove(os.path.join(root, name))
        elif name.startswith(f".{key}.tmp-"):
            beat = os.path.join(root, name.replace(".tmp-", ".building-"))
            try:
                alive = time.time() - os.stat(beat).st_mtime < STALE_S
            except OSError:
                alive = False
            if not alive:  # a concurrent job's build beats; this one's builder is gone
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                if os.path.exists(beat):
                    os.remove(beat)


def _wait(entry: str, failed: str, beat: str, builder: int) -> None:
    last, moved = None, time.monotonic()
    while not complete(entry):
        if os.path.exists(failed):
            with open(failed) as f:
                message = f.read()
            raise DataError(message if message else f"rank {builder} failed to build the data cache")
        try:
            stamp = os.stat(beat).st_mtime
        except OSError:
            stamp = None
        if stamp != last:
            last, moved = stamp, time.monotonic()
        elif time.monotonic() - moved > STALE_S:
            raise DataError(
                f"rank {builder}, which builds the data cache {entry}, has not moved for {STALE_S:.0f}s; it may have "
                "died: check its log, then start again (the cache is rebuilt)"
            )
        time.sleep(0.2)


def save_meta(entry: str, meta: dict[str, Any]) -> None:
    with open(os.path.join(entry, META), "w") as f:
        json.dump(meta, f, indent=2)
