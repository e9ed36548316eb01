"""Hostile safetensors headers are refused before any tensor byte is read: bad header lengths,
overlapping or out-of-range offsets, wrong dtypes and shapes, bad names, truncated files.

Each bad file must raise CheckpointError naming the file and the reason, quickly, without
allocating memory that scales with a claimed size."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ernie_edge.errors import CheckpointError
from ernie_edge.mmap_store import MAX_HEADER_BYTES, SafetensorsFile
from ernie_edge.quant.safetensors_writer import PlannedTensor, StreamingWriter


def raw_file(path, header: bytes, data: bytes = b"", length: int | None = None):
    """A file with an explicit 8-byte header length (default: the real one)."""
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def json_file(path, header: dict, data: bytes = b""):
    return raw_file(path, json.dumps(header).encode(), data)


def refused(path, match: str, max_alloc: int = 64 << 20, max_seconds: float = 1.0):
    """Open `path`; it must be refused fast, with the file name and `match` in the message, and
    without allocating more than `max_alloc` bytes (64 MB by default)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=match) as info:
            SafetensorsFile(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < max_seconds
    assert peak < max_alloc
    assert path.name in str(info.value)
    return str(info.value)


def good_tensors(path, alignment=1):
    tensors = [PlannedTensor("a", "F32", (3, 4)), PlannedTensor("b", "U8", (5,)), PlannedTensor("c", "F16", (2, 2))]
    w = StreamingWriter(path, tensors, alignment=alignment)
    w.write("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write("b", np.arange(5, dtype=np.uint8))
    w.write("c", np.ones((2, 2), np.float16))
    w.close()
    return path


def test_good_file_views(tmp_path):
    f = SafetensorsFile(good_tensors(tmp_path / "ok.safetensors", alignment=64))
    a = f.view("a")
    assert a.shape == (3, 4) and a[2, 3] == 11 and not a.flags.writeable
    assert list(f.view("b")) == [0, 1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="no tensor named 'zz'"):
        f.view("zz")


# ---- A1: header length and header bytes ----------------------------------------------------------

@pytest.mark.parametrize("length, match", [
    (0, "too small"), (1, "too small"),
    (8, "runs past the end"), (10_000, "runs past the end"),
    (MAX_HEADER_BYTES + 1, "exceeds"), (2**64 - 1, "exceeds"),
])
def test_header_length(tmp_path, length, match):
    refused(raw_file(tmp_path / "len.safetensors", b'{"a":1}', length=length), match)


@pytest.mark.parametrize("size", [0, 1, 4, 7])
def test_shorter_than_length_field(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x08" * size)
    refused(path, "shorter than the 8-byte header length")


@pytest.mark.parametrize("header, match", [
    (b"[1, 2]  ", "does not start with"),
    (b"\x80\x04\x95 pickle", "does not start with"),
    (b"{\"a\xff\xfe\": 1}", "UTF-8"),
    (b'{"a": {"dtype": "F32", "sha', "not valid JSON"),
    (b"{}garbage", "not valid JSON"),
])
def test_header_bytes(tmp_path, header, match):
    refused(raw_file(tmp_path / "hdr.safetensors", header), match)


def test_pickle_renamed_safetensors(tmp_path):
    import pickle
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": list(range(100))}))
    refused(path, "not a valid safetensors file")


# ---- A2: offsets ---------------------------------------------------------------------------------

def entry(dtype="U8", shape=(4,), begin=0, end=4):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("tensors, data, match", [
    ({"a": entry(begin=0, end=4), "b": entry(begin=2, end=6)}, 6, "overlaps"),
    ({"a": entry(begin=0, end=4), "b": entry(begin=0, end=4)}, 4, "overlaps"),
    ({"a": entry(begin=0, end=4), "b": entry(begin=6, end=10)}, 10, "hole of 2 bytes"),
    ({"a": entry(begin=4, end=0)}, 4, "out of order"),
    ({"a": entry(begin=-4, end=0)}, 4, "out of order or negative"),
    ({"a": entry(begin=0, end=4)}, 2, "truncated"),
    ({"a": entry(begin=0, end=4)}, 9, "5 unexpected trailing bytes"),
    ({"a": entry(shape=(2,), begin=0, end=4)}, 4, "is 2 bytes but data_offsets span 4"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0]}}, 4, "data_offsets must be"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0.0, 4.0]}}, 4, "data_offsets must be"),
])
def test_bad_offsets(tmp_path, tensors, data, match):
    refused(json_file(tmp_path / "off.safetensors", tensors, b"\0" * data), match)


def test_many_tensors_aliasing_the_same_bytes(tmp_path):
    import psutil
    header = {f"t{i}": entry(begin=0, end=4) for i in range(100_000)}
    path = json_file(tmp_path / "alias.safetensors", header, b"\0" * 4)
    before = psutil.Process().memory_info().rss
    with pytest.raises(CheckpointError, match="overlaps"):
        SafetensorsFile(path)
    assert psutil.Process().memory_info().rss - before < 64 << 20


@st.composite
def offset_tables(draw):
    """Random (begin, end) tables over a small buffer; most are invalid in some way."""
    n = draw(st.integers(1, 6))
    spans = [(draw(st.integers(-2, 40)), draw(st.integers(-2, 40))) for _ in range(n)]
    extra = draw(st.integers(-3, 3))
    return spans, extra


def tiles_exactly(spans, size):
    pos = 0
    for b, e in sorted(spans):
        if b != pos or e < b:
            return False
        pos = e
    return pos == size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=offset_tables())
def test_hypothesis_offsets(tmp_path, table):
    spans, extra = table
    header = {f"t{i}": {"dtype": "U8", "shape": [max(e - b, 0)], "data_offsets": [b, e]}
              for i, (b, e) in enumerate(spans)}
    size = max([e for _, e in spans] + [0]) + extra
    if size < 0:
        return
    path = json_file(tmp_path / "hyp.safetensors", header, b"\0" * size)
    valid = all(0 <= b <= e for b, e in spans) and tiles_exactly(spans, size)
    if valid:
        f = SafetensorsFile(path)
        for name, (b, e) in zip(header, spans):
            assert f.view(name).shape == (e - b,)
    else:
        refused(path, "not a valid safetensors file")


# ---- A3: dtype, shape, overflow ------------------------------------------------------------------

@pytest.mark.parametrize("ent, match", [
    (entry(dtype="F128"), "unknown dtype 'F128'"),
    (entry(dtype=7), "unknown dtype"),
    (entry(shape=(-4,)), "shape must be"),
    (entry(shape=(2.0, 2)), "shape must be"),
    (entry(shape=(True, 4)), "shape must be"),
    (entry(shape=(1,) * 9), "shape must be"),
    (entry(dtype="F32", shape=(2**42 + 1, 2**22)), "data_offsets span 4"),
    (entry(dtype="F64", shape=(2**62, 2**62)), "data_offsets span 4"),
    ("not an object", "entry is not an object"),
])
def test_bad_dtype_shape(tmp_path, ent, match):
    path = json_file(tmp_path / "dt.safetensors", {"w.weight": ent}, b"\0" * 4)
    # A3: refused before any allocation sized by the claim (the file is ~100 bytes).
    msg = refused(path, match, max_alloc=2 * path.stat().st_size + (256 << 10))
    assert "w.weight" in msg


# ---- A4: names and metadata ----------------------------------------------------------------------

def test_nul_name_escaped(tmp_path):
    msg = refused(json_file(tmp_path / "nul.safetensors", {"w\x00.hidden": entry()}, b"\0" * 4), "invalid tensor name")
    assert "\x00" not in msg and "\\x00" in msg


def test_control_chars_escaped(tmp_path):
    msg = refused(json_file(tmp_path / "ctl.safetensors", {"w\n\x1b[31mred": entry()}, b"\0" * 4), "invalid tensor name")
    assert "\n" not in msg.split(": ", 1)[1] and "\x1b" not in msg


def test_duplicate_keys(tmp_path):
    header = b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'
    refused(raw_file(tmp_path / "dup.safetensors", header, b"\0" * 4), "duplicate key 'a'")


def test_huge_name(tmp_path):
    msg = refused(json_file(tmp_path / "big.safetensors", {"x" * (1 << 20): entry()}, b"\0" * 4), "invalid tensor name")
    assert len(msg) < 2000


@pytest.mark.parametrize("meta", [{"format": 1}, ["x"], {"a": {"b": "c"}}, "str"])
def test_bad_metadata(tmp_path, meta):
    refused(json_file(tmp_path / "meta.safetensors", {"__metadata__": meta, "a": entry()}, b"\0" * 4),
            "__metadata__ must map strings to strings")


def test_empty_header_and_empty_tensors(tmp_path):
    f = SafetensorsFile(json_file(tmp_path / "empty.safetensors", {}))
    assert f.keys() == []
    f = SafetensorsFile(json_file(tmp_path / "zero.safetensors", {"z": entry(shape=(0, 3), end=0)}))
    assert f.view("z").shape == (0, 3)


# ---- A5: truncation ------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["1", "half", "last-1", "header-1"])
def test_truncated(tmp_path, cut):
    path = good_tensors(tmp_path / "t.safetensors", alignment=64)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    keep = {"1": 1, "half": len(data) // 2, "last-1": len(data) - 1, "header-1": 8 + n - 1}[cut]
    path.write_bytes(data[:keep])
    refused(path, "shorter than|runs past the end|truncated")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: file not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")


# ---- A12: our own files must be 64-byte aligned ---------------------------------------------------

def test_padded_file_passes_alignment_check(tmp_path):
    f = SafetensorsFile(good_tensors(tmp_path / "pad.safetensors", alignment=64), alignment=64)
    assert f.view("c").shape == (2, 2)
    assert not any(name.startswith("__pad__.") for name in f.keys())  # filler is not model data


def test_alignment_required_for_edge_files(tmp_path):
    path = good_tensors(tmp_path / "unaligned.safetensors", alignment=1)
    SafetensorsFile(path)  # fine for an HF shard
    with pytest.raises(CheckpointError, match="not a multiple of 64"):
        SafetensorsFile(path, alignment=64)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x00", b"GGUF"])
def test_tiny_files(tmp_path, content):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(content)
    refused(path, "shorter than the 8-byte header length")


# ---- 2 MiB pages ---------------------------------------------------------------------------------

SMAPS = """\
7f0000000000-7f0000400000 r--s 00000000 fe:00 123 /models/a.safetensors
Size:               4096 kB
Rss:                4096 kB
FilePmdMapped:      2048 kB
VmFlags: rd sh mr mw me ms hg
7f0000400000-7f0000600000 r--s 00000000 fe:00 124 /models/b.safetensors
Size:               2048 kB
Rss:                   0 kB
FilePmdMapped:         0 kB
00400000-00452000 r-xp 00000000 fe:00 1 /usr/bin/python
Rss:                 328 kB
"""


def test_mapping_huge_fraction_reads_its_own_mapping():
    from ernie_edge.mmap_store import mapping_huge_fraction

    assert mapping_huge_fraction(0x7F0000000000, SMAPS) == 0.5
    assert mapping_huge_fraction(0x7F0000400000, SMAPS) is None  # nothing resident
    assert mapping_huge_fraction(0x400000, SMAPS) == 0.0  # zero-padded short address, no PMD line
    assert mapping_huge_fraction(0x123000, SMAPS) is None  # no such mapping


def test_huge_page_advice_and_fraction_on_a_real_map(tmp_path):
    f = SafetensorsFile(good_tensors(tmp_path / "ok.safetensors", alignment=64))
    assert f.advise_huge_pages() in (True, False)  # False only where the OS has no THP
    assert f.populate() in (True, False)
    frac = f.huge_page_fraction()
    assert frac is None or 0.0 <= frac <= 1.0
    f.unmap_pages()
    f.drop_cached_pages()
    assert list(f.view("b")) == [0, 1, 2, 3, 4]  # the data comes back from the file
