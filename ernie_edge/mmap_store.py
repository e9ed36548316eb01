"""The only place that knows about mmap: open safetensors files, validate every header, and hand
out read-only numpy views of the tensors (zero copy).

Every byte is treated as hostile: the header length, the JSON, each name,
dtype, shape and offset are checked with Python integers (no overflow) before a single tensor
byte is touched, and the tensors must tile the data section exactly (no holes, no overlaps, no
trailing bytes), as the safetensors spec requires.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_NAME_CHARS = 1024
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux value; not in every Python
HUGE_PAGE = 2 * 1024 * 1024  # x86-64 / arm64 PMD size: one TLB entry maps this much
# Filler tensors our writer inserts to keep the next tensor aligned (quant/safetensors_writer.py).
PAD_PREFIX = "__pad__."

# safetensors dtype -> numpy dtype of the raw view. BF16 is exposed as its raw uint16 bits.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _printable(name: str) -> str:
    """Names go into error messages: escape control characters (no log injection)."""
    return name.encode("unicode_escape", "backslashreplace").decode("ascii")[:200]


def loads_strict(text: str, duplicate_error):
    """json.loads that refuses duplicate keys (a classic parser-differential trick): raises
    duplicate_error(key), an exception the caller builds with its own file name."""
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise duplicate_error(k)
            seen[k] = v
        return seen
    return json.loads(text, object_pairs_hook=no_duplicates)


def read_header(path: Path, file_size: int, fobj) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate the header of an open safetensors file.

    Returns (tensors by name, __metadata__, start of the data section)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file: {why}")

    if file_size < 8:
        raise bad(f"file is {file_size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(fobj.read(8), "little")
    if n < 2:
        raise bad(f"header length {n} is too small")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                  "(is this a pickle or another format renamed .safetensors?)")
    if 8 + n > file_size:
        raise bad(f"header length {n} runs past the end of the file ({file_size} bytes): truncated?")
    raw = fobj.read(n)
    if raw[:1] != b"{":
        raise bad("header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    try:
        header = loads_strict(text.rstrip(" "), lambda k: bad(f"duplicate key {_printable(k)!r} in header"))
    except json.JSONDecodeError as e:
        raise bad(f"header is not valid JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")

    data_start = 8 + n
    data_size = file_size - data_start
    tensors = {name: _tensor_info(name, entry, data_start, bad) for name, entry in header.items()}

    # The tensors must tile [0, data_size) exactly: sorted by offset, each starts where the last ended.
    pos = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if t.offset != pos:
            why = "overlaps the previous tensor" if t.offset < pos else f"leaves a hole of {t.offset - pos} bytes"
            raise bad(f"tensor {_printable(t.name)!r} at data offset {t.offset - data_start} {why}")
        pos += t.nbytes
    if pos != file_size:
        if pos > file_size:
            raise bad(f"tensors need {pos - data_start} data bytes but the file has {data_size}: truncated?")
        raise bad(f"{file_size - pos} unexpected trailing bytes after the last tensor")
    return tensors, metadata, data_start


def _tensor_info(name, entry, data_start: int, bad) -> TensorInfo:
    if not name or len(name) > MAX_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise bad(f"invalid tensor name {_printable(name)!r} (empty, too long, or control characters)")
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise bad(f"{where}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"{where}: unknown dtype {str(dtype)[:20]!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise bad(f"{where}: shape must be a list of at most 8 non-negative integers, got {str(shape)[:80]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"{where}: data_offsets must be [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"{where}: data_offsets [{begin}, {end}] are out of order or negative")
    count = 1
    for d in shape:  # Python ints: no overflow however large the claimed shape
        count *= d
    nbytes = count * DTYPES[dtype].itemsize
    if nbytes != end - begin:
        raise bad(f"{where}: shape {shape} x {dtype} is {nbytes} bytes but data_offsets span {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, nbytes)


class SafetensorsFile:
    """A validated, read-only memory map of one safetensors file."""

    def __init__(self, path: str | Path, alignment: int = 1):
        self.path = Path(path)
        try:
            fobj = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror}") from None
        with fobj:
            size = os.fstat(fobj.fileno()).st_size
            self.tensors, self.metadata, self.data_start = read_header(self.path, size, fobj)
            pads = [name for name in self.tensors if name.startswith(PAD_PREFIX)]
            for name in pads:
                del self.tensors[name]  # byte filler, not model data
            for t in self.tensors.values():
                if t.offset % alignment:
                    raise CheckpointError(f"{self.path}: tensor {t.name!r} starts at byte {t.offset}, "
                                          f"not a multiple of {alignment}; the file was not written by "
                                          "ernie-edge convert (re-run the conversion)")
            self.file_size = size
            # mmap of a 0-byte data section is not allowed; such a file has no tensor bytes to view.
            self._map = mmap.mmap(fobj.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def view(self, name: str) -> np.ndarray:
        """A read-only numpy view of the tensor's bytes (BF16 comes back as uint16 bits)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        dtype = DTYPES[t.dtype]
        count = t.nbytes // dtype.itemsize
        if count == 0:
            return np.zeros(t.shape, dtype)
        arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=t.offset)
        return arr.reshape(t.shape)

    def advise(self, name: str, advice: int) -> None:
        """madvise() the pages of one tensor (e.g. mmap.MADV_WILLNEED before it is read)."""
        t = self.tensors[name]
        page = mmap.PAGESIZE
        start = (t.offset // page) * page
        if self._map is not None and t.nbytes and hasattr(self._map, "madvise"):
            self._map.madvise(advice, start, t.offset + t.nbytes - start)

    def populate(self) -> bool:
        """Map every page of the file into this process now (MADV_POPULATE_READ, Linux >= 5.14),
        instead of one page fault at a time on first use. False where the OS cannot."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return False
        try:
            self._map.madvise(MADV_POPULATE_READ)
        except OSError:  # older kernel (EINVAL) or another OS
            return False
        return True

    def advise_huge_pages(self) -> bool:
        """Ask for the file to be mapped in 2 MiB pages (MADV_HUGEPAGE on the whole map).

        Decode streams gigabytes of weights per token; with 4 KiB pages every 4 KiB costs a TLB
        miss (a nested page walk in a VM). With 2 MiB pages a weight file reads ~1.6x faster and
        whole-model decode ran ~1.3x faster (docs/PERF.md, "Memory & mmap"). Pages the
        kernel reads in from now on come as 2 MiB folios where the filesystem supports it;
        pages already cached keep their size (see `huge_page_fraction`), and a fault reads in the
        whole 2 MiB around it (so EdgeCheckpoint asks only when the model fits in memory). False
        where the OS cannot (no THP, another OS)."""
        if self._map is None or not hasattr(mmap, "MADV_HUGEPAGE"):
            return False
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            return False
        return True

    def huge_page_fraction(self, smaps: str | None = None) -> float | None:
        """The fraction of this file's mapped bytes that sit in 2 MiB pages (/proc/self/smaps
        FilePmdMapped over Rss of this mapping); None where the OS does not say (not Linux).
        smaps: a text from read_smaps() to reuse (reading it walks every mapping's page tables:
        ~40 ms with a 13 GB model mapped), else it is read now."""
        if self._map is None:
            return None
        start = np.frombuffer(self._map, dtype=np.uint8, count=1).ctypes.data
        return mapping_huge_fraction(start, smaps)

    def drop_cached_pages(self) -> None:
        """Tell the OS this file's cached pages are not needed (POSIX_FADV_DONTNEED): it drops the
        clean ones no process maps, and later reads fetch them again from disk. The file is
        read-only to us, so nothing can be lost; it costs one read of the file."""
        if not hasattr(os, "posix_fadvise"):
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def unmap_pages(self) -> None:
        """Remove this process's page-table entries for the file (MADV_DONTNEED on a read-only
        file map: the next access faults the pages back in; the data is the file's)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        # Views may still reference the map; dropping our handle lets it close when they go.
        self._map = None


def read_smaps() -> str | None:
    """The text of /proc/self/smaps, or None where there is none (not Linux)."""
    try:
        with open("/proc/self/smaps") as f:
            return f.read()
    except OSError:
        return None


def mapping_huge_fraction(address: int, smaps: str | None = None) -> float | None:
    """FilePmdMapped / Rss of the mapping that starts at `address`, from /proc/self/smaps (or the
    given text of one); None when it cannot be read, has no such mapping, or none of it is resident."""
    if smaps is None:
        smaps = read_smaps()
        if smaps is None:
            return None
    lines = smaps.splitlines()
    want = f"{address:08x}-"
    for i, line in enumerate(lines):
        if not line.startswith(want):
            continue
        fields = {}
        for row in lines[i + 1:]:
            key, _, rest = row.partition(":")
            if not rest or "-" in key:  # the next mapping's header line
                break
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0])
        rss = fields.get("Rss", 0)
        return fields.get("FilePmdMapped", 0) / rss if rss else None
    return None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32 exactly: the bf16 bits are the high half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Any floating safetensors tensor as float32 (a new array; the view stays read-only)."""
    if dtype == "BF16":
        return bf16_to_f32(arr)
    if dtype in ("F32", "F16", "F64"):
        return arr.astype(np.float32)
    raise CheckpointError(f"dtype {dtype} is not a floating-point weight type")
