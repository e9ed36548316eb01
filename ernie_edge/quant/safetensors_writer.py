"""A streaming safetensors writer: the header (every name, dtype, shape) is known up front and
written first, then tensors are written one at a time in header order, so peak memory is one
tensor (or one chunk of it), whatever the file size.

Data offsets are aligned to `alignment` bytes (64 for ernie-edge model folders, so that mmap
views are SIMD-aligned). The header is padded with trailing spaces (allowed by the spec), and
where a tensor's size would misalign the next one, a small U8 tensor named `__pad__.N` fills the
gap: the safetensors rule "no holes between tensors" still holds, and readers skip those names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ernie_edge.mmap_store import DTYPES, PAD_PREFIX



@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype, e.g. "BF16", "U8", "F16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n




def plan_layout(tensors: list[PlannedTensor], alignment: int) -> list[PlannedTensor]:
    """Insert U8 padding tensors so that every real tensor starts at a multiple of `alignment`
    relative to the data section (the header itself is padded to `alignment` too)."""
    out, pos, n_pad = [], 0, 0
    for t in tensors:
        if pos % alignment:
            gap = alignment - pos % alignment
            out.append(PlannedTensor(f"{PAD_PREFIX}{n_pad}", "U8", (gap,)))
            n_pad += 1
            pos += gap
        out.append(t)
        pos += t.nbytes
    return out


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None,
                  alignment: int) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    pad = (-(8 + len(raw))) % alignment
    raw += b" " * pad
    return len(raw).to_bytes(8, "little") + raw


class StreamingWriter:
    """Write one safetensors file tensor by tensor, in the planned order."""

    def __init__(self, path: str | Path, tensors: list[PlannedTensor],
                 metadata: dict[str, str] | None = None, alignment: int = 64):
        self.path = Path(path)
        self.plan = plan_layout(list(tensors), alignment)
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(encode_header(self.plan, metadata, alignment))
        self._skip_padding()

    def _skip_padding(self) -> None:
        while self._next < len(self.plan) and self.plan[self._next].name.startswith(PAD_PREFIX):
            self._f.write(b"\0" * self.plan[self._next].nbytes)
            self._next += 1

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor. `array` may be written in several calls with `write_chunk`."""
        self.begin(name)
        self.write_chunk(array)
        self.end()

    def begin(self, name: str) -> None:
        t = self.plan[self._next] if self._next < len(self.plan) else None
        if t is None or t.name != name:
            raise ValueError(f"{self.path}: expected tensor {t.name if t else '(none)'!r}, got {name!r}")
        self._remaining = t.nbytes

    def write_chunk(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            raise ValueError("big-endian arrays are not supported")
        buf = memoryview(data).cast("B")
        if buf.nbytes > self._remaining:
            raise ValueError(f"{self.path}: tensor {self.plan[self._next].name!r} got too many bytes")
        self._f.write(buf)
        self._remaining -= buf.nbytes

    def end(self) -> None:
        if self._remaining:
            raise ValueError(f"{self.path}: tensor {self.plan[self._next].name!r} is "
                             f"{self._remaining} bytes short")
        self._next += 1
        self._skip_padding()

    def close(self, fsync: bool = True) -> None:
        if self._next != len(self.plan):
            self._f.close()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.plan)} tensors")
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()
