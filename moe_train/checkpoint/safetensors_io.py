"""safetensors files read by byte range and written as a stream, on any fsspec filesystem.

The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte offsets, then the raw bytes.  Knowing every tensor's shape up front (we do: from
the model config) lets the writer emit the header first and then append tensors one at a time,
so no more than one tensor (one gathered module under ZeRO-3) is ever held for writing.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.spec import AbstractBufferedFile

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
WRITE_BLOCK = 5 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


MAX_HEADER = 100 * 2**20  # the safetensors library's limit


class SafetensorsReader:
    """Reads whole tensors or element ranges of them without loading the file.

    The header is checked before any tensor byte is used, as the safetensors library does: every
    entry has a known dtype, a shape of non-negative ints and offsets that span exactly
    ``numel * itemsize`` bytes; the ranges tile the data area without gaps or overlaps, and the
    data area ends where the file ends (a truncated file or an offset past EOF is refused).
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self._f = fs.open(path, "rb")
        try:
            self.tensors = self._parse(fs.size(path))
        except BaseException:
            self._f.close()
            raise

    def _bad(self, why: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid safetensors file ({why}); re-download or re-export it")

    def _parse(self, file_size: int) -> dict[str, TensorInfo]:
        raw = self._f.read(8)
        if len(raw) < 8:
            raise self._bad(f"{file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > file_size:
            raise self._bad(f"header of {n} bytes in a file of {file_size}")
        try:
            header = json.loads(self._f.read(n))
        except (ValueError, RecursionError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        header.pop("__metadata__", None)
        tensors, spans = {}, []
        for key, v in header.items():
            if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
                raise self._bad(f"{key}: expected dtype, shape and data_offsets")
            if not isinstance(v["dtype"], str) or v["dtype"] not in DTYPES:
                raise ValueError(
                    f"{self.path} holds tensors of dtype {v['dtype']!r}, which moe-train cannot read; "
                    "convert the checkpoint to bf16 or fp32"
                )
            shape, offsets = v["shape"], v["data_offsets"]
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise self._bad(f"{key}: shape {shape!r} is not a list of non-negative integers")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]
            ):
                raise self._bad(f"{key}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
            dtype = DTYPES[v["dtype"]]
            if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
                raise self._bad(f"{key}: {offsets[1] - offsets[0]} bytes for shape {shape} of {v['dtype']}")
            tensors[key] = TensorInfo(dtype, tuple(shape), 8 + n + offsets[0])
            spans.append((offsets[0], offsets[1], key))
        end = 0
        for begin, stop, key in sorted(spans):
            if begin != end:
                raise self._bad(
                    f"{key} starts at byte {begin} of the data, "
                    f"{'overlapping the tensor before' if begin < end else f'leaving a gap after {end}'}"
                )
            end = stop
        if 8 + n + end != file_size:
            raise self._bad(
                f"the tensors end at byte {8 + n + end} but the file has {file_size} "
                f"({'truncated' if 8 + n + end > file_size else 'trailing bytes'})"
            )
        return tensors

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the row-major flattening; the whole tensor (shaped) by default."""
        info = self.tensors[key]
        whole = start == 0 and end is None
        end = info.numel if end is None else end
        size = torch.tensor([], dtype=info.dtype).element_size()
        self._f.seek(info.begin + start * size)
        data = bytearray(self._f.read((end - start) * size))
        flat = torch.frombuffer(data, dtype=info.dtype) if data else torch.empty(0, dtype=info.dtype)
        return flat.view(info.shape) if whole else flat

    def close(self) -> None:
        self._f.close()


@dataclass
class PlannedTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def header_bytes(tensors: list[PlannedTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsStreamWriter:
    """Writes one file whose tensors are announced up front and then appended in that order."""

    def __init__(self, fs: Any, path: str, tensors: list[PlannedTensor]) -> None:
        self.path = path
        self._pending = list(tensors)
        # Object stores upload in parts of block_size: 5 MiB (S3's minimum part) bounds the
        # writer's buffer whatever the shard size.
        self._f = fs.open(path, "wb", block_size=WRITE_BLOCK)
        self._f.write(header_bytes(tensors))

    @property
    def done(self) -> bool:
        return not self._pending

    def append(self, key: str, tensor: torch.Tensor) -> None:
        expected = self._pending[0] if self._pending else None
        if expected is None or expected.key != key:
            raise RuntimeError(f"{self.path}: got {key} but the planned next tensor is {expected and expected.key}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"{key}: {tuple(tensor.shape)} {tensor.dtype} != planned {expected.shape} {expected.dtype}"
            )
        self._pending.pop(0)
        if tensor.numel():
            self._f.write(tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy().data)
        if not self._pending:
            self._f.close()

    def abort(self) -> None:
        # On object stores close() would complete the upload of a truncated file; discard it.
        if isinstance(self._f, AbstractBufferedFile):
            self._f.discard()
            self._f.closed = True  # else its finaliser would still try to upload the dropped buffer
        else:
            self._f.close()
