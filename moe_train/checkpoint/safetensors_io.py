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
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
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


class SafetensorsReader:
    """Reads whole tensors or element ranges of them without loading the file."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self._f = fs.open(path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e}); re-download or re-export it") from None
        header.pop("__metadata__", None)
        unknown = sorted({v["dtype"] for v in header.values()} - set(DTYPES))
        if unknown:
            raise ValueError(f"{path} holds tensors of dtype {unknown}, which moe-train cannot read; convert the "
                             "checkpoint to bf16 or fp32")
        self.tensors = {
            k: TensorInfo(DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0])
            for k, v in header.items()
        }

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
        header[t.key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
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
            raise RuntimeError(f"{key}: {tuple(tensor.shape)} {tensor.dtype} != planned {expected.shape} {expected.dtype}")
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
