"""Checkpoints in a family's official HF layout on any fsspec URL.

Layout: ``config.json``, ``model-0000i-of-0000n.safetensors`` shards with the family's HF keys
(per-expert for DeepSeek: ``model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight``),
``model.safetensors.index.json`` (or a single ``model.safetensors`` when reading), the tokenizer
files and any remote-code ``*.py`` of the source.  Writing ends with the index and then
``COMPLETE``: a directory without them is a partial export and is never read as a finished one.
The family comes from config.json's ``model_type`` (``moe_train.models.spec_for``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from moe_train.checkpoint.safetensors_io import PlannedTensor, SafetensorsReader, SafetensorsStreamWriter
from moe_train.models import spec_for, spec_of
from moe_train.models.common.key_map import Slot, canonical_name
from moe_train.storage import redact, resolve

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COMPLETE = "COMPLETE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def read_config(url: str, storage_options: dict[str, Any] | None = None, **layout: Any) -> Any:
    """The config of the checkpoint at ``url``, as its family's config class (``layout``: expert layout)."""
    fs, root = resolve(url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{redact(url)} does not exist; pass a checkpoint directory or URL")
    path = posixpath.join(root, "config.json")
    if not fs.exists(path):
        raise FileNotFoundError(f"{redact(url)} has no config.json; is it a HF checkpoint directory?")
    with fs.open(path, "r") as f:
        d = json.load(f)
    return spec_for(d.get("model_type")).config(d, **layout)


class HFCheckpoint:
    """Tensor source over the safetensors files of a checkpoint, read lazily by key and range."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = resolve(url, storage_options)
        self._readers: dict[str, SafetensorsReader] = {}
        index = posixpath.join(self.root, INDEX)
        if self.fs.exists(index):
            with self.fs.open(index, "r") as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif self.fs.exists(posixpath.join(self.root, SINGLE)):
            self._readers[SINGLE] = SafetensorsReader(self.fs, posixpath.join(self.root, SINGLE))
            self.weight_map = dict.fromkeys(self._readers[SINGLE].tensors, SINGLE)
        else:
            raise FileNotFoundError(f"{url} has neither {INDEX} nor {SINGLE}; is it a complete HF checkpoint?")

    def keys_by_file(self) -> Iterator[tuple[str, list[str]]]:
        """Keys grouped by file, so that one file at a time is open."""
        files: dict[str, list[str]] = {}
        for key, file in self.weight_map.items():
            files.setdefault(file, []).append(key)
        for file, keys in sorted(files.items()):
            yield file, keys
            if file in self._readers:
                self._readers.pop(file).close()

    def _reader(self, key: str) -> SafetensorsReader:
        file = self.weight_map[key]
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(self.fs, posixpath.join(self.root, file))
        return self._readers[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).tensors[key].shape

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self._reader(key).read(key, start, end)


def check_keys(expected: Iterable[str], found: Iterable[str], url: str) -> None:
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = ([f"missing {show(missing)}"] if missing else []) + ([f"unexpected {show(unexpected)}"] if unexpected else [])
        raise ValueError(f"{url}: weights do not match config.json: {'; '.join(parts)}; "
                         "check that the checkpoint and its config.json belong together")


def expected_hf_keys(model: torch.nn.Module) -> dict[str, tuple[Slot, tuple[int, ...]]]:
    """HF key -> (slot, HF shape) for every tensor the model stores, in checkpoint order.

    Shapes come from the same model built on the meta device, so a partitioned (ZeRO-3) or wrapped
    model needs no introspection of its parameters here."""
    ours_to_hf = spec_of(model).ours_to_hf
    out = {}
    for name, shape in reference_shapes(model).items():
        for key, slot in ours_to_hf(name, model.config):
            out[key] = (slot, slot.shape(shape))
    return out


def reference_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name -> full shape, from the model's family built on the meta device."""
    with torch.device("meta"):
        reference = spec_of(model).build(model.config)
    return {name: tuple(p.shape) for name, p in reference.named_parameters()}


@torch.no_grad()
def load_into(model: torch.nn.Module, source: Any, partition: Callable[[torch.Tensor], Any] | None = None) -> None:
    """Fill `model` from a tensor source (HFCheckpoint, or anything with weight_map, keys_by_file,
    shape and read(key, start, end)).

    ``partition(param)`` returns (this rank's flat partition, its first element) of a partitioned
    parameter, or None for a whole one (``moe_train.parallel.zero3.partition`` for ZeRO-3): each
    rank then reads only the element range of each tensor that falls in its own partition."""
    expected = expected_hf_keys(model)
    check_keys(expected, source.weight_map, source.url)
    shapes = reference_shapes(model)
    params = {canonical_name(name): p for name, p in model.named_parameters()}
    elsewhere = set(shapes) - set(params)  # other ranks' routed experts (expert parallelism): not read here
    for _, keys in source.keys_by_file():
        for key in keys:
            slot, shape = expected[key]
            if slot.param in elsewhere:
                continue
            if tuple(source.shape(key)) != shape:
                raise ValueError(f"{source.url}: {key} has shape {list(source.shape(key))}, config.json implies "
                                 f"{list(shape)}; the checkpoint does not match its config")
            param = params[slot.param]
            part = partition(param) if partition is not None else None
            if part is None:
                slot.view(param.data).copy_(source.read(key))
                continue
            local, p_start = part
            s_start, s_end = slot.flat_range(shapes[slot.param])
            lo, hi = max(s_start, p_start), min(s_end, p_start + local.numel())
            if lo < hi:
                local[lo - p_start:hi - p_start].copy_(source.read(key, lo - s_start, hi - s_start))


def load_pretrained(url: str, *, moe_implementation: str = "shard", expert_in_one_shard: int | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attn_backend: str = "auto",
                    storage_options: dict[str, Any] | None = None) -> torch.nn.Module:
    """The model of whatever registered family the checkpoint at ``url`` holds, weights loaded."""
    cfg = read_config(url, storage_options, moe_implementation=moe_implementation,
                      expert_in_one_shard=expert_in_one_shard)
    ckpt = HFCheckpoint(url, storage_options)
    with torch.device("meta"):
        model = spec_of(cfg).build(cfg, attn_backend=attn_backend)
    model = model.to_empty(device=device).to(dtype)
    load_into(model, ckpt)
    return model


class HFExportWriter:
    """Streams tensors into size-bounded safetensors shards, then writes index, config, COMPLETE.

    Tensors must be written in the order given at construction (the order in which the model's
    parameters are gathered).  Nothing but the current tensor is buffered here.  Shards are planned
    as transformers plans them (huggingface_hub): in order, a tensor above the limit in a file of its own.
    """

    def __init__(self, url: str, tensors: list[PlannedTensor], max_shard_size: int | str = "5GB",
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = resolve(url, storage_options)
        by_key = {t.key: t for t in tensors}
        try:
            split = split_state_dict_into_shards_factory(by_key, get_storage_size=lambda t: t.nbytes,
                                                         filename_pattern="model{suffix}.safetensors",
                                                         max_shard_size=max_shard_size)
        except ValueError:
            raise ValueError(f"max_shard_size={max_shard_size!r} is not a size; use bytes or e.g. '5GB', "
                             "'500MB'") from None
        groups = list(split.filename_to_tensors.values())
        n = len(groups)
        self.files = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": [by_key[k] for k in keys]
                      for i, keys in enumerate(groups)}
        self.weight_map = {t.key: name for name, planned in self.files.items() for t in planned}
        self.total_size = sum(t.nbytes for t in tensors)
        self._open: dict[str, SafetensorsStreamWriter] = {}
        self._done: set[str] = set()
        self.fs.makedirs(self.root, exist_ok=True)
        # An earlier export here stops being complete before any of its files is replaced.
        for name in (COMPLETE, INDEX):
            if self.fs.exists(posixpath.join(self.root, name)):
                self.fs.rm(posixpath.join(self.root, name))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        name = self.weight_map[key]
        if name not in self._open:
            if name in self._done:
                raise RuntimeError(f"{self.url}: {key} arrived after its file {name} was finished")
            self._open[name] = SafetensorsStreamWriter(self.fs, posixpath.join(self.root, name), self.files[name])
        writer = self._open[name]
        writer.append(key, tensor)
        if writer.done:
            del self._open[name]
            self._done.add(name)

    def finish(self, config: Any, tokenizer_dir: str | None = None, extra: dict[str, Any] | None = None,
               source_dir: str | None = None) -> None:
        if self._open or len(self._done) != len(self.files):
            raise RuntimeError(f"{self.url}: export finished before all tensors were written")
        if tokenizer_dir:
            copy_files(tokenizer_dir, self.fs, self.root, TOKENIZER_FILES)
        if source_dir:  # DeepSeek's remote modeling code, so trust_remote_code users can load the export
            src_fs, src_root = resolve(source_dir)
            code = [posixpath.basename(p) for p in src_fs.ls(src_root, detail=False) if p.endswith(".py")]
            copy_files(source_dir, self.fs, self.root, code)
        dtypes = [t.dtype for planned in self.files.values() for t in planned]
        dtype = max(set(dtypes), key=dtypes.count)  # what the weights were written in
        self._put("config.json", config.to_hf_dict(torch_dtype=str(dtype).removeprefix("torch.")))
        self._put(INDEX, {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map})
        self._put(COMPLETE, {"files": list(self.files), **(extra or {})})

    def abort(self) -> None:
        for writer in self._open.values():
            writer.abort()
        self._open.clear()

    def _put(self, name: str, obj: Any) -> None:
        with self.fs.open(posixpath.join(self.root, name), "w") as f:
            json.dump(obj, f, indent=2)


def copy_files(src: str, fs: Any, root: str, names: Iterable[str]) -> None:
    """Copy those of ``names`` that exist in directory ``src`` into ``root`` on ``fs``."""
    src_fs, src_root = resolve(src)
    for name in names:
        path = posixpath.join(src_root, name)
        if src_fs.exists(path):
            with src_fs.open(path, "rb") as fin, fs.open(posixpath.join(root, name), "wb") as fout:
                fout.write(fin.read())


def is_complete(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, root = resolve(url, storage_options)
    return fs.exists(posixpath.join(root, COMPLETE))


@torch.no_grad()
def save_pretrained(model: torch.nn.Module, url: str, *, tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                    is_writer: bool = True, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
                    tokenizer_dir: str | None = None, extra: dict[str, Any] | None = None,
                    source_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
    """Stream ``model`` into the HF layout at ``url`` (per-expert keys; index and COMPLETE last).

    ``tensors`` yields (parameter name, full tensor) in ``named_parameters`` order; by default the
    model's own parameters (one process, full tensors).  For a partitioned model every rank passes
    ``moe_train.parallel.zero3.gathered_parameters(model)`` (each item is a collective) and only the
    ``is_writer`` rank writes; no more than one gathered parameter is held at a time.
    """
    expected = expected_hf_keys(model)
    ours_to_hf = spec_of(model).ours_to_hf
    writer = None
    if is_writer:
        dtypes = {canonical_name(name): p.dtype for name, p in model.named_parameters()}
        planned = [PlannedTensor(k, dtype or dtypes[slot.param], shape) for k, (slot, shape) in expected.items()]
        writer = HFExportWriter(url, planned, max_shard_size, storage_options)
    try:
        for name, full in model.named_parameters() if tensors is None else tensors:
            if writer is None:
                continue
            for key, slot in ours_to_hf(name, model.config):
                t = slot.view(full.data)
                writer.write(key, t if dtype is None else t.to(dtype))
        if writer is not None:
            writer.finish(model.config, tokenizer_dir, extra, source_dir)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
