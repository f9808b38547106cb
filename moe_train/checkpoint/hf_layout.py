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
import math
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from moe_train.checkpoint.safetensors_io import PlannedTensor, SafetensorsReader, SafetensorsStreamWriter
from moe_train.models import spec_for, spec_of
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.key_map import Slot, canonical_name
from moe_train.storage import redact, resolve

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # FP8 checkpoints: "{weight}_scale_inv" holds the weight's block scales
FP8_BLOCK = 128
SINGLE = "model.safetensors"
COMPLETE = "COMPLETE"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # where transformers 5 keeps the chat template (the one trained with)
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


def _read_json(fs: Any, path: str, shown: str) -> Any:
    """A small JSON file; any way it fails is one ValueError naming ``shown`` (and the line)."""
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); fix the file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start}); fix the file") from None
    except (ValueError, RecursionError) as e:  # 4300+ digit integers, nesting too deep
        raise ValueError(
            f"{shown}: unreadable JSON ({str(e).splitlines()[0] or type(e).__name__}); fix the file"
        ) from None


def read_config(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The config of the checkpoint at ``url``, as its family's config class."""
    fs, root = resolve(url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{redact(url)} does not exist; pass a checkpoint directory or URL")
    path = posixpath.join(root, "config.json")
    if not fs.exists(path):
        raise FileNotFoundError(f"{redact(url)} has no config.json; is it a HF checkpoint directory?")
    shown = f"{redact(url).rstrip('/')}/config.json"
    d = _read_json(fs, path, shown)
    spec = spec_for(d.get("model_type") if isinstance(d, dict) else None)
    try:
        return spec.config(d)
    except (ValueError, TypeError) as e:  # TypeError: a field the config class does not take as a keyword
        raise ValueError(f"{shown}: {e}") from None


def _weight_map(index: Any, shown: str) -> dict[str, str]:
    """The index's key -> file map, every file a plain name inside the checkpoint directory."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{shown} has no weight_map (a JSON object of tensor name -> file name); re-export the "
            "checkpoint or remove the index next to a single model.safetensors"
        )
    for key, file in weight_map.items():
        if (
            not isinstance(file, str)
            or not file.endswith(".safetensors")
            or posixpath.isabs(file)
            or "\\" in file
            or posixpath.normpath(file) != file
            or file.split("/")[0] == ".."
        ):
            raise ValueError(
                f"{shown}: {key} points to {file!r}, outside the checkpoint directory; file names "
                "in weight_map must be .safetensors files next to the index"
            )
    return weight_map


class HFCheckpoint:
    """Tensor source over the safetensors files of a checkpoint, read lazily by key and range.

    Block-FP8 checkpoints (DeepSeek V3, Kimi K2): a weight stored as float8_e4m3 comes with
    ``{key}_scale_inv`` (fp32, one scale per 128 x 128 block, the last blocks partial) and is read
    dequantised to fp32, ``q * scale_inv`` of its block, for any element range; the scale keys are
    consumed with their weights and are not in ``weight_map``.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = resolve(url, storage_options)
        self._readers: dict[str, SafetensorsReader] = {}
        index = posixpath.join(self.root, INDEX)
        if self.fs.exists(index):
            files: dict[str, str] = _weight_map(
                _read_json(self.fs, index, f"{redact(url).rstrip('/')}/{INDEX}"), f"{redact(url).rstrip('/')}/{INDEX}"
            )
        elif self.fs.exists(posixpath.join(self.root, SINGLE)):
            self._readers[SINGLE] = SafetensorsReader(self.fs, posixpath.join(self.root, SINGLE))
            files = dict.fromkeys(self._readers[SINGLE].tensors, SINGLE)
        else:
            raise FileNotFoundError(f"{url} has neither {INDEX} nor {SINGLE}; is it a complete HF checkpoint?")
        self._files = files
        # weight key -> its block scales
        self.scales = {k.removesuffix(SCALE_SUFFIX): k for k in files if k.endswith(".weight" + SCALE_SUFFIX)}
        orphans = sorted(set(self.scales) - set(files))
        if orphans:
            raise ValueError(f"{url}: scales without weights: {', '.join(orphans[:4])}; the checkpoint is incomplete")
        self.weight_map = {k: f for k, f in files.items() if not k.endswith(".weight" + SCALE_SUFFIX)}

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
        file = self._files[key]
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(self.fs, posixpath.join(self.root, file))
        return self._readers[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        """The dtype ``read`` returns: fp32 for a dequantised FP8 weight, else the stored one."""
        return torch.float32 if key in self.scales else self._reader(key).tensors[key].dtype

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        if key in self.scales:
            return self._dequantised(key, start, end)
        return self._reader(key).read(key, start, end)

    def _dequantised(self, key: str, start: int, end: int | None) -> torch.Tensor:
        """Elements [start, end) of FP8 weight ``key`` times its block scales, reading only the rows they span."""
        info, scale_key = self._reader(key).tensors[key], self.scales[key]
        if info.dtype != torch.float8_e4m3fn or len(info.shape) != 2:
            raise ValueError(
                f"{self.url}: {key} has {scale_key} but is {info.dtype} {list(info.shape)}, not a 2-D "
                "float8_e4m3fn weight; the checkpoint is not in DeepSeek's block-FP8 format"
            )
        rows, cols = info.shape
        B = FP8_BLOCK
        scale_shape = (-(-rows // B), -(-cols // B))
        if tuple(self.shape(scale_key)) != scale_shape:
            raise ValueError(
                f"{self.url}: {scale_key} has shape {list(self.shape(scale_key))}, expected "
                f"{list(scale_shape)} for {B} x {B} blocks of {list(info.shape)}"
            )
        whole = start == 0 and end is None
        end = rows * cols if end is None else end
        r0, r1 = start // cols, -(-end // cols)  # the rows the range touches
        b0, b1 = r0 // B, -(-r1 // B)  # their row blocks
        q = self._reader(key).read(key, r0 * cols, r1 * cols).view(r1 - r0, cols).float()
        n = scale_shape[1]
        scale = self._reader(scale_key).read(scale_key, b0 * n, b1 * n).view(b1 - b0, n).float()
        scale = scale.repeat_interleave(B, dim=0)[r0 - b0 * B : r1 - b0 * B].repeat_interleave(B, dim=1)[:, :cols]
        flat = (q * scale).reshape(-1)[start - r0 * cols : end - r0 * cols]
        return flat.view(rows, cols) if whole else flat


def check_keys(expected: Iterable[str], found: Iterable[str], url: str) -> None:
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = ([f"missing {show(missing)}"] if missing else []) + (
            [f"unexpected {show(unexpected)}"] if unexpected else []
        )
        raise ValueError(
            f"{url}: weights do not match config.json: {'; '.join(parts)}; "
            "check that the checkpoint and its config.json belong together"
        )


def expected_hf_keys(model: torch.nn.Module) -> dict[str, tuple[Slot, tuple[int, ...]]]:
    """HF key -> (slot, HF shape) for every tensor the model stores, in checkpoint order.

    Shapes come from the same model built on the meta device, so a partitioned (ZeRO-3) or wrapped
    model needs no introspection of its parameters here."""
    ours_to_hf = spec_of(model).ours_to_hf
    out = {}
    for name, shape in reference_shapes(model).items():
        for key, slot in ours_to_hf(name, model.config, model.layout):
            out[key] = (slot, slot.shape(shape))
    return out


def reference_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name -> full shape, from the model's family built on the meta device;
    the persistent buffers (DeepSeek V3's correction bias) follow the parameters."""
    with torch.device("meta"):
        reference = spec_of(model).build(model.config, model.layout)
    return {name: tuple(p.shape) for name, p in [*reference.named_parameters(), *persistent_buffers(reference)]}


def parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of the tensors held in parameters (what a training checkpoint's ranges cover);
    persistent buffers are left out (the checkpoint's state keeps them whole)."""
    buffers = {canonical_name(name) for name, _ in persistent_buffers(model)}
    return {k: shape for k, (slot, shape) in expected_hf_keys(model).items() if slot.param not in buffers}


def persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers a state dict holds: never ZeRO-partitioned, whole on every rank."""
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buf


def carried_keys(model: torch.nn.Module, source: Any) -> list[str]:
    """Keys of ``source`` the model does not hold but an export copies (DeepSeek V3's MTP layers)."""
    carried = spec_of(model).carried_key
    return [] if carried is None else [k for k in source.weight_map if carried(model.config, k)]


def check_source(model: torch.nn.Module, source: Any) -> None:
    """Every tensor the model takes from ``source`` has the shape config.json implies and a float dtype
    (a float tensor retyped as integers of the same size would load as reinterpreted bits).  Headers
    only: it runs before anything is allocated (``model`` may be on the meta device)."""
    expected = expected_hf_keys(model)
    carried = set(carried_keys(model, source))
    check_keys(expected, set(source.weight_map) - carried, source.url)
    for _, keys in source.keys_by_file():
        for key in keys:
            if key in carried:
                continue
            shape, dtype = tuple(source.shape(key)), source.dtype(key)
            if shape != expected[key][1]:
                raise ValueError(
                    f"{source.url}: {key} has shape {list(shape)}, config.json implies "
                    f"{list(expected[key][1])}; the checkpoint does not match its config"
                )
            if not dtype.is_floating_point:
                raise ValueError(
                    f"{source.url}: {key} is stored as {str(dtype).removeprefix('torch.')}, but it is a float "
                    "weight (integers would load as reinterpreted bits); re-download or re-export the checkpoint"
                )


def check_checkpoint(cfg: Any, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """``check_source`` for the model ``cfg`` describes and the HF checkpoint at ``url``, before any allocation."""
    with torch.device("meta"):
        reference = spec_of(cfg).build(cfg)
    check_source(reference, HFCheckpoint(url, storage_options))


def host_memory() -> int:
    """This host's memory in bytes, or its container's (cgroup) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


@torch.no_grad()
def load_into(model: torch.nn.Module, source: Any, partition: Callable[[torch.Tensor], Any] | None = None) -> None:
    """Fill `model` from a tensor source (HFCheckpoint, or anything with weight_map, keys_by_file,
    shape and read(key, start, end)).

    ``partition(param)`` returns (this rank's flat partition, its first element) of a partitioned
    parameter, or None for a whole one (``moe_train.parallel.zero3.partition`` for ZeRO-3): each
    rank then reads only the element range of each tensor that falls in its own partition."""
    expected = expected_hf_keys(model)
    carried = set(carried_keys(model, source))
    check_source(model, source)
    shapes = reference_shapes(model)
    params = {canonical_name(name): p for name, p in [*model.named_parameters(), *persistent_buffers(model)]}
    elsewhere = set(shapes) - set(params)  # other ranks' routed experts (expert parallelism): not read here
    for _, keys in source.keys_by_file():
        for key in keys:
            if key in carried:
                continue
            slot, _ = expected[key]
            if slot.param in elsewhere:
                continue
            param = params[slot.param]
            part = partition(param) if partition is not None else None
            if part is None:
                slot.view(param.data).copy_(source.read(key))
                continue
            local, p_start = part
            s_start, s_end = slot.flat_range(shapes[slot.param])
            lo, hi = max(s_start, p_start), min(s_end, p_start + local.numel())
            if lo < hi:
                local[lo - p_start : hi - p_start].copy_(source.read(key, lo - s_start, hi - s_start))


def load_pretrained(
    url: str,
    *,
    moe_implementation: str = "shard",
    expert_in_one_shard: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_backend: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model of whatever registered family the checkpoint at ``url`` holds, weights loaded, its routed
    experts in the layout given."""
    cfg = read_config(url, storage_options)
    layout = ExpertLayout(moe_implementation, expert_in_one_shard)
    layout.check(cfg.num_experts)
    with torch.device("meta"):
        model = spec_of(cfg).build(cfg, layout, attn_backend=attn_backend)
    # Nothing is allocated before the config is checked against this host and the weights' headers.
    need = sum(math.prod(shape) for shape in reference_shapes(model).values()) * dtype.itemsize
    if torch.device(device).type == "cpu" and need > host_memory():
        raise ValueError(
            f"{redact(url).rstrip('/')}/config.json implies {need / 2**30:,.1f} GiB of {str(dtype)[6:]} weights, more "
            f"than this host's {host_memory() / 2**30:,.1f} GiB of memory; check its sizes (hidden_size, layers, "
            "experts, vocab_size) or load it on a larger host"
        )
    ckpt = HFCheckpoint(url, storage_options)
    check_source(model, ckpt)
    model = model.to_empty(device=device).to(dtype)
    load_into(model, ckpt)
    return model


class HFExportWriter:
    """Streams tensors into size-bounded safetensors shards, then writes index, config, COMPLETE.

    Tensors must be written in the order given at construction (the order in which the model's
    parameters are gathered).  Nothing but the current tensor is buffered here.  Shards are planned
    as transformers plans them (huggingface_hub): in order, a tensor above the limit in a file of its own.
    """

    def __init__(
        self,
        url: str,
        tensors: list[PlannedTensor],
        max_shard_size: int | str = "5GB",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.fs, self.root = resolve(url, storage_options)
        by_key = {t.key: t for t in tensors}
        try:
            split = split_state_dict_into_shards_factory(
                by_key,
                get_storage_size=lambda t: t.nbytes,
                filename_pattern="model{suffix}.safetensors",
                max_shard_size=max_shard_size,
            )
        except ValueError:
            raise ValueError(
                f"max_shard_size={max_shard_size!r} is not a size; use bytes or e.g. '5GB', '500MB'"
            ) from None
        groups = list(split.filename_to_tensors.values())
        n = len(groups)
        self.files = {
            f"model-{i + 1:05d}-of-{n:05d}.safetensors": [by_key[k] for k in keys] for i, keys in enumerate(groups)
        }
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

    def finish(
        self,
        config: Any,
        tokenizer_dir: str | None = None,
        extra: dict[str, Any] | None = None,
        source_dir: str | None = None,
        before_complete: Callable[[], None] | None = None,
    ) -> None:
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
        if before_complete is not None:  # the run's lease check, right before the commit point
            before_complete()
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
def save_pretrained(
    model: torch.nn.Module,
    url: str,
    *,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    is_writer: bool = True,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | None = None,
    extra: dict[str, Any] | None = None,
    source_dir: str | None = None,
    carry_from: Any = None,
    storage_options: dict[str, Any] | None = None,
    before_complete: Callable[[], None] | None = None,
) -> list[str]:
    """Stream ``model`` into the HF layout at ``url`` (per-expert keys; index and COMPLETE last).

    ``tensors`` yields (parameter name, full tensor) in ``named_parameters`` order; by default the
    model's own parameters (one process, full tensors).  For a partitioned model every rank passes
    ``moe_train.parallel.zero3.gathered_parameters(model)`` (each item is a collective) and only the
    ``is_writer`` rank writes; no more than one gathered parameter is held at a time.  Persistent
    buffers (whole on every rank) follow the parameters.  ``carry_from`` (a tensor source, the run's
    source checkpoint) supplies the keys the family carries untrained (``carried_keys``): copied
    unchanged, FP8 ones dequantised to the export's dtype.  ``before_complete`` runs just before
    COMPLETE is written (a run's lease check).  Returns the carried keys.
    """
    expected = expected_hf_keys(model)
    ours_to_hf = spec_of(model).ours_to_hf
    carried = [] if carry_from is None else carried_keys(model, carry_from)
    writer = None
    if is_writer:
        dtypes = {canonical_name(name): p.dtype for name, p in [*model.named_parameters(), *persistent_buffers(model)]}
        planned = [PlannedTensor(k, dtype or dtypes[slot.param], shape) for k, (slot, shape) in expected.items()]
        export_dtype = dtype or max(set(dtypes.values()), key=list(dtypes.values()).count)
        carried_dtypes = {
            k: export_dtype if k in getattr(carry_from, "scales", {}) else carry_from.dtype(k) for k in carried
        }
        planned += [PlannedTensor(k, carried_dtypes[k], tuple(carry_from.shape(k))) for k in carried]
        writer = HFExportWriter(url, planned, max_shard_size, storage_options)
    try:
        for name, full in model.named_parameters() if tensors is None else tensors:
            if writer is None:
                continue
            for key, slot in ours_to_hf(name, model.config, model.layout):
                t = slot.view(full.data)
                writer.write(key, t if dtype is None else t.to(dtype))
        if writer is not None:
            for name, buf in persistent_buffers(model):
                for key, slot in ours_to_hf(name, model.config, model.layout):
                    t = slot.view(buf.data)
                    writer.write(key, t if dtype is None else t.to(dtype))
            for key in carried:
                writer.write(key, carry_from.read(key).to(carried_dtypes[key]))
            writer.finish(model.config, tokenizer_dir, extra, source_dir, before_complete)
        return carried
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
