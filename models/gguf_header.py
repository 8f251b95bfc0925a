"""A GGUF file's header: its metadata and tensor table, read straight from the file.

gguf-py's GGUFReader keeps every tokenizer string as numpy arrays of its own: 170 MB of memory for
the default model's 49K-token vocabulary, more than its 4-bit weights. Here the tokenizer's string
arrays are only counted (the tokenizer is read by transformers, once, and cached); numbers and
other strings are kept."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32}
_NUMPY |= {6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # GGUF's order: innermost dimension first
    tensor_type: GGMLQuantizationType
    data_offset: int  # from the start of the file
    n_bytes: int
    n_elements: int


class Header(NamedTuple):
    meta: dict  # key -> value; the tokenizer's string arrays as range(count)
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, data):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        self.at += n
        if self.at > len(self.data):
            raise ValueError("a string runs past the end of the file")
        return bytes(self.data[self.at - n : self.at]).decode("utf-8") if keep else None

    def value(self, kind: int, key: str):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown metadata type {kind} for {key}")
        item, count = self.take("I"), self.take("Q")
        if item == STRING:
            keep = not key.startswith("tokenizer.ggml.")
            strings = [self.string(keep) for _ in range(count)]
            return strings if keep else range(count)
        if item not in _NUMPY:
            return [self.value(item, key) for _ in range(count)]
        dtype = np.dtype(_NUMPY[item])
        array = np.frombuffer(self.data, dtype, count, self.at).copy()
        self.at += count * dtype.itemsize
        return array


def read_header(path: Path) -> Header:
    """The metadata and tensor table of `path`; ValueError on a file that is not GGUF v2/v3."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _parse(data)
        except struct.error:
            raise ValueError("the header runs past the end of the file") from None


def _parse(data) -> Header:
    cursor = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("no GGUF magic number")
    cursor.at = 4
    version = cursor.take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (2 and 3 are read)")
    n_tensors, n_meta = cursor.take("Q"), cursor.take("Q")
    meta = {}
    for _ in range(n_meta):
        key = cursor.string()
        meta[key] = cursor.value(cursor.take("I"), key)
    table = []
    for _ in range(n_tensors):
        name = cursor.string()
        shape = tuple(cursor.take("Q") for _ in range(cursor.take("I")))
        kind, offset = GGMLQuantizationType(cursor.take("I")), cursor.take("Q")
        table.append((name, shape, kind, offset))
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cursor.at // alignment) * alignment
    tensors = []
    for name, shape, kind, offset in table:
        elements = int(np.prod(shape, dtype=np.int64))
        block, size = GGML_QUANT_SIZES[kind]
        info = TensorInfo(name, shape, kind, start + offset, elements // block * size, elements)
        if info.data_offset + info.n_bytes > len(data):
            raise ValueError(f"the tensor {name} runs past the end of the file")
        tensors.append(info)
    return Header(meta, tensors)
