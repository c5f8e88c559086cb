"""A fast GGUF header reader: metadata and tensor locations, numpy only.

`gguf.GGUFReader` materialises every metadata array (a tokenizer's ~50k tokens and merges)
as numpy objects, which takes seconds. Serving only needs the scalar metadata and where each
tensor lies, so this reader skips arrays it is not asked for. Format: GGUF v2/v3
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # GGUF order: fastest-varying dimension first
    ggml_type: int
    offset: int                 # absolute byte offset in the file


class _Cursor:
    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.buffer[self.pos:self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buffer, self.pos)[0]


def _read_value(cursor: _Cursor, value_type: int, keep_arrays: bool) -> Any:
    if value_type in _SCALARS:
        return cursor.unpack(_SCALARS[value_type])
    if value_type == _STRING:
        return cursor.string()
    if value_type != _ARRAY:
        raise GGUFFormatError(f"unknown GGUF value type {value_type}")
    item_type, count = cursor.unpack("<I"), cursor.unpack("<Q")
    if not keep_arrays and item_type in _SCALARS:
        cursor.pos += count * struct.calcsize(_SCALARS[item_type])
        return _SkippedArray(count)
    if not keep_arrays and item_type == _STRING:
        for _ in range(count):
            cursor.skip_string()
        return _SkippedArray(count)
    return [_read_value(cursor, item_type, keep_arrays) for _ in range(count)]


@dataclass(frozen=True)
class _SkippedArray:
    """An array left unread; only its length is known."""
    length: int

    def __len__(self) -> int:
        return self.length


def read_gguf_header(path: str, keep_arrays: bool = False) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, tensor infos) of the GGUF file at `path`; arrays skipped unless asked."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        if buffer[:4] != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
        cursor = _Cursor(buffer)
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = _read_value(cursor, cursor.unpack("<I"), keep_arrays)
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
            ggml_type, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            infos.append((name, dims, ggml_type, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-cursor.pos // alignment) * alignment
    return metadata, [TensorInfo(n, d, t, data_start + o) for n, d, t, o in infos]
