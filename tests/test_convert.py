"""The converter (quant/convert.py): round trip, determinism, resume after interruption and kill -9,
and bad inputs (hostile headers, missing or extra tensors, hostile config values, NaN/Inf, pickle
files, shard-index paths leading out of the folder, a full disk)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ernie_edge
import ernie_edge.quant.convert as convert_mod
from ernie_edge.edge_checkpoint import EdgeCheckpoint
from ernie_edge.errors import ErnieEdgeError, ModelNotFoundError
from ernie_edge.hf_checkpoint import HFCheckpoint
from ernie_edge.manifest import describe, format_description, read_manifest, verify
from ernie_edge.mmap_store import SafetensorsFile
from ernie_edge.quant import synthetic
from ernie_edge.quant.convert import ConvertError, ConvertSettings, convert
from ernie_edge.formats.quant import (dequantize_q4, dequantize_q8, dequantize_qn, quantize_q4, quantize_q8,
                                      quantize_qn)
from ernie_edge.formats.layout import ROWS, TILED_BITS, TILES4, has_tiles, tile_rows
from ernie_edge.formats.recipe import Recipe
from ernie_edge.formats.table import choose_storage
from ernie_edge.quant.safetensors_writer import PlannedTensor, StreamingWriter
from ernie_edge.reference import ReferenceModel

TOKENIZER_JSON = json.dumps({"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {}, "merges": []}})


def make_source(folder: Path, **kwargs) -> Path:
    src = synthetic.write_checkpoint(folder, "tiny", tokenizer=False, **kwargs)
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    return src


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def reference_out(source, tmp_path_factory):
    """An uninterrupted conversion with default settings: what every other run must reproduce."""
    return convert(ConvertSettings(source=str(source), dest=tmp_path_factory.mktemp("ref") / "out",
                                   progress=False, threads=1))


@pytest.fixture
def src_copy(source, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(source, dst)
    return dst


def run(src, dest, **kwargs) -> Path:
    kwargs.setdefault("progress", False)
    return convert(ConvertSettings(source=str(src), dest=dest, **kwargs))


def manifest_bytes(folder: Path) -> bytes:
    return (folder / "manifest.json").read_bytes()


def assert_no_complete_folder(dest: Path):
    """Neither DST nor its staging folder loads as a model."""
    for folder in (dest, dest.with_name(dest.name + ".partial")):
        with pytest.raises(ErnieEdgeError):
            ernie_edge.load(folder)
        with pytest.raises(ErnieEdgeError):
            EdgeCheckpoint(folder)


# ---- round trip ----------------------------------------------------------------------------------

class Dequantized:
    """WeightSource: the HF weights quantized and dequantized by ernie_edge/formats/quant.py directly."""

    def __init__(self, hf: HFCheckpoint, recipe: Recipe):
        self.hf, self.recipe, self.config = hf, recipe, hf.config

    def _roundtrip(self, name: str) -> np.ndarray:
        w = self.hf.f32(name)
        fmt, group = self.recipe.storage_for(self.hf.specs[name].role)
        quant, G = choose_storage(fmt, w.shape[-1], group or 32)
        if quant == "q4":
            return dequantize_q4(*quantize_q4(w, G), G)
        if quant == "q8":
            return dequantize_q8(*quantize_q8(w, G), G)
        if quant in ("q5", "q6"):
            bits = int(quant[1])
            return dequantize_qn(*quantize_qn(w, G, bits), G, bits)
        return w.astype(np.float16).astype(np.float32) if quant == "f16" else w

    def dense(self, name):
        return self._roundtrip(name)

    def expert(self, layer, e):
        return tuple(self._roundtrip(f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight")
                     for p in ("gate", "up", "down"))


@pytest.mark.parametrize("recipe", [Recipe(), Recipe(expert_bits=8, dense_bits=16, group_size=32), Recipe.default()],
                         ids=["q4g32-d8", "q8g32-d16", "default"])
def test_round_trip_logits(source, tmp_path, recipe):
    out = run(source, tmp_path / "out", recipe=recipe)
    assert verify(out) == []
    ids = [1, 17, 300, 5, 900, 42, 7, 7, 1000]
    got = ernie_edge.load(out, backend="reference").logits(ids)
    want = ReferenceModel(Dequantized(HFCheckpoint(source), recipe)).forward(ids, ReferenceModel(
        Dequantized(HFCheckpoint(source), recipe)).new_cache())
    want = want @ Dequantized(HFCheckpoint(source), recipe).dense("model.embed_tokens.weight").T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # and the quantized model is close to, but not the same as, the bf16 source
    orig = ernie_edge.load(source).logits(ids)
    assert 0 < np.abs(got - orig).max() < 0.5 * np.abs(orig).max()


def test_packed_matrices_are_stored_in_tiles(tmp_path, monkeypatch):
    """int4 / int5 / int6 matrices with whole 4-row tiles and 128-code spans go in 4-row tiles
    (formats/layout.py, format version 2), the rest by rows; the same model converted by rows (as
    before layouts) holds the same codes in row order and runs to the same bits."""
    src = make_source(tmp_path / "src", hidden_size=128)  # K = 128: some matrices tile, some do not
    tiled = run(src, tmp_path / "tiled")
    m = read_manifest(tiled)
    assert m.format_version == 2
    for t in m.tensors.values():
        has = t.format.bits in TILED_BITS and len(t.shape) >= 2 and has_tiles(*t.shape[-2:])
        assert t.layout == (TILES4 if has else ROWS), t.name
    assert {t.layout for t in m.tensors.values()} == {ROWS, TILES4}
    monkeypatch.setattr(convert_mod, "storage_layout", lambda bits, shape: ROWS)
    rows = run(src, tmp_path / "rows")
    a, b = EdgeCheckpoint(tiled), EdgeCheckpoint(rows)
    for name, t in m.tensors.items():
        qa, qb = a.qtensor(name), b.qtensor(name)
        want = tile_rows(qb.data, t.format.bits) if t.layout == TILES4 else qb.data
        np.testing.assert_array_equal(qa.data, want)
        np.testing.assert_array_equal(qa.dequantize(), qb.dequantize())
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    fa, fb = ernie_edge.load(tiled), ernie_edge.load(rows)
    ca, cb = fa.new_cache(), fb.new_cache()
    np.testing.assert_array_equal(fa.prefill(prompt, ca), fb.prefill(prompt, cb))
    np.testing.assert_array_equal(fa.decode(7, ca), fb.decode(7, cb))


def test_folder_layout(reference_out, source):
    m = read_manifest(reference_out)
    assert m.recipe == Recipe.default().to_dict()
    assert set(m.files) == {"dense.safetensors", "experts-01.safetensors", "experts-02.safetensors",
                            "config.json", "tokenizer.json"}
    assert m.source["path"] == str(source.resolve())
    assert all(name.startswith("model.mtp_") for name in m.skipped) and m.skipped
    t = m.tensors
    assert t["model.layers.1.mlp.gate.weight"].quant == "f32"
    assert t["model.layers.1.mlp.moe_statics.e_score_correction_bias"].quant == "f32"
    assert t["model.norm.weight"].quant == "f32"
    # the default recipe at the tiny width 64: group 128 falls back to 64 (32 for the experts' down)
    assert (t["model.embed_tokens.weight"].quant, t["model.embed_tokens.weight"].group_size) == ("q6", 64)
    assert (t["model.layers.1.mlp.shared_experts.up_proj.weight"].quant,
            t["model.layers.1.mlp.shared_experts.up_proj.weight"].group_size) == ("q5", 32)
    assert t["layers.01.experts.down"].shape == (16, 64, 32) and t["layers.01.experts.down"].quant == "q4"
    assert t["layers.01.experts.down"].group_size == 32
    f = SafetensorsFile(reference_out / "experts-01.safetensors")
    assert f.tensors["layers.01.experts.gate.qweight"].dtype == "U8"
    assert f.tensors["layers.01.experts.gate.qweight"].shape == (16, 32, 32)
    assert f.tensors["layers.01.experts.gate.scales"].shape == (16, 32, 1)
    d = SafetensorsFile(reference_out / "dense.safetensors")
    assert d.tensors["model.embed_tokens.weight.qweight"].shape == (1024, 64 * 6 // 8)
    assert all(info.offset % 64 == 0 for name, info in f.tensors.items() if not name.startswith("__pad__"))
    assert (reference_out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert not (reference_out / "progress.json").exists()
    assert not any(p.name.endswith(".partial") for p in reference_out.iterdir())
    assert not reference_out.with_name(reference_out.name + ".partial").exists()


def test_default_dest_in_models_dir(source, tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_EDGE_HOME", str(tmp_path / "home"))
    out = convert(ConvertSettings(source=str(source), progress=False))
    assert out == tmp_path / "home" / "models" / f"{source.name}-q4g128-d6-s5g32"
    assert EdgeCheckpoint(out).config.hidden_size == 64


def test_tokenizer_json_built_from_tokenizer_model(tmp_path):
    pytest.importorskip("ernie_edge.tokenizer")
    src = synthetic.write_checkpoint(tmp_path / "src", "tiny", layers=2)
    assert not (src / "tokenizer.json").exists()
    out = run(src, tmp_path / "out")
    again = run(src, tmp_path / "again")  # the built tokenizer.json is deterministic too
    assert manifest_bytes(out) == manifest_bytes(again)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    assert verify(out) == []


# ---- determinism (C3) ----------------------------------------------------------------------------

def test_deterministic_across_runs_and_threads(source, reference_out, tmp_path):
    out = run(source, tmp_path / "out", threads=2)
    assert manifest_bytes(out) == manifest_bytes(reference_out)
    for name in read_manifest(out).files:
        assert (out / name).read_bytes() == (reference_out / name).read_bytes(), name


# ---- interruption and resume (C1) ----------------------------------------------------------------

class Interrupt(BaseException):
    pass


def interrupt_on(monkeypatch, predicate) -> None:
    """Make the converter stop (as if by Ctrl-C) right after the durable step `predicate` accepts."""
    def hook(event):
        if predicate(event):
            raise Interrupt(event)
    monkeypatch.setattr(convert_mod, "_hook", hook)


def no_interrupt(monkeypatch) -> None:
    monkeypatch.setattr(convert_mod, "_hook", lambda event: None)


@pytest.mark.parametrize("event", ["file:dense.safetensors", "file:experts-01.safetensors",
                                   "file:experts-02.safetensors", "manifest", "finalized"])
def test_resume_after_interrupt(source, reference_out, tmp_path, monkeypatch, event):
    dest = tmp_path / "out"

    interrupt_on(monkeypatch, lambda e: e == event)
    with pytest.raises(Interrupt):
        run(source, dest)
    assert not dest.exists()
    assert_no_complete_folder(dest)
    staging = dest.with_name("out.partial")
    finished = {p.name: p.stat().st_mtime_ns for p in staging.iterdir() if p.name.endswith(".safetensors")}
    no_interrupt(monkeypatch)
    out = run(source, dest)
    assert manifest_bytes(out) == manifest_bytes(reference_out)
    assert verify(out) == [] and not staging.exists()
    for name, mtime in finished.items():  # finished files were kept, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime


def test_resume_after_interrupt_mid_file(source, reference_out, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    calls = [0]
    original = StreamingWriter.write_chunk

    def write_chunk(self, array):
        calls[0] += "experts-01" in self.path.name
        if calls[0] == 5:  # the fifth expert of experts-01
            raise KeyboardInterrupt
        return original(self, array)
    monkeypatch.setattr(StreamingWriter, "write_chunk", write_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(source, dest, threads=2)
    staging = dest.with_name("out.partial")
    assert sorted(p.name for p in staging.iterdir()) == ["dense.safetensors", "progress.json"]
    assert_no_complete_folder(dest)
    monkeypatch.setattr(StreamingWriter, "write_chunk", original)
    assert manifest_bytes(run(source, dest)) == manifest_bytes(reference_out)


def test_resume_redoes_a_damaged_finished_file(source, reference_out, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    interrupt_on(monkeypatch, lambda e: e == "file:experts-01.safetensors")
    with pytest.raises(Interrupt):
        run(source, dest)
    damaged = dest.with_name("out.partial") / "dense.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    no_interrupt(monkeypatch)
    out = run(source, dest)
    assert manifest_bytes(out) == manifest_bytes(reference_out) and verify(out) == []


def test_staging_of_another_recipe_is_refused(source, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    interrupt_on(monkeypatch, lambda e: e.startswith("file:"))
    with pytest.raises(Interrupt):
        run(source, dest)
    no_interrupt(monkeypatch)
    with pytest.raises(ConvertError, match=r"out.partial.*different source, recipe.*delete"):
        run(source, dest, recipe=Recipe(expert_bits=8))


def test_concurrent_conversion_refused(source, tmp_path, monkeypatch):
    import fcntl
    dest = tmp_path / "out"
    interrupt_on(monkeypatch, lambda e: e.startswith("file:"))
    with pytest.raises(Interrupt):
        run(source, dest)
    no_interrupt(monkeypatch)
    fd = os.open(dest.with_name("out.partial"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running conversion holds
        with pytest.raises(ConvertError, match="another ernie-edge convert is writing"):
            run(source, dest)
    finally:
        os.close(fd)
    assert verify(run(source, dest)) == []


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import ernie_edge.quant.convert as c
from ernie_edge.quant.safetensors_writer import StreamingWriter
point = sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point.startswith("chunk:"):
    n, original, calls = int(point[6:]), StreamingWriter.write_chunk, [0]
    def write_chunk(self, array):
        calls[0] += 1
        if calls[0] == n:
            die()
        return original(self, array)
    StreamingWriter.write_chunk = write_chunk
else:
    c._hook = lambda e: die() if e == point else None
c.convert(c.ConvertSettings(source=sys.argv[1], dest=Path(sys.argv[2]), progress=False, threads=2))
"""


# The tiny conversion writes 157 chunks (55 in dense, 51 per experts file). Per commit: 10 kill
# points; nightly (slow): 20 evenly spaced chunks + 3 in finalization.
KILL_POINTS = ["chunk:1", "chunk:30", "chunk:56", "chunk:80", "chunk:107", "chunk:140",
               "file:dense.safetensors", "file:experts-02.safetensors", "manifest", "finalized"]
SLOW_KILL_POINTS = [f"chunk:{k}" for k in np.linspace(1, 157, 20).astype(int)] + [
    "file:tokenizer.json", "manifest", "finalized"]


def kill_at(source, dest, point):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(source), str(dest), point],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def check_killed_then_resumed(source, reference_out, dest):
    assert_no_complete_folder(dest)
    out = run(source, dest)
    assert manifest_bytes(out) == manifest_bytes(reference_out)
    assert verify(out) == []
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    assert not dest.with_name(dest.name + ".partial").exists()


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9(source, reference_out, tmp_path, point):
    kill_at(source, tmp_path / "out", point)
    check_killed_then_resumed(source, reference_out, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("point", SLOW_KILL_POINTS)
def test_kill_9_nightly(source, reference_out, tmp_path, point):
    kill_at(source, tmp_path / "out", point)
    check_killed_then_resumed(source, reference_out, tmp_path / "out")


def test_kill_9_after_rename_leaves_a_complete_folder(source, reference_out, tmp_path):
    dest = tmp_path / "out"
    kill_at(source, dest, "renamed")
    assert manifest_bytes(dest) == manifest_bytes(reference_out) and verify(dest) == []
    assert ernie_edge.load(dest).config.hidden_size == 64
    with pytest.raises(ConvertError, match="already there"):
        run(source, dest)


# ---- destination rules ---------------------------------------------------------------------------

def test_existing_dest_refused_unless_force(source, reference_out, tmp_path):
    dest = run(source, tmp_path / "out")
    with pytest.raises(ConvertError, match=r"out: a converted model is already there; pass --force"):
        run(source, dest)
    old_inode = (dest / "dense.safetensors").stat().st_ino
    held = EdgeCheckpoint(dest)  # a mapping of the old folder stays valid through the swap (H3)
    before = held.dense("model.norm.weight").copy()
    out = run(source, dest, force=True)
    assert out == dest and manifest_bytes(out) == manifest_bytes(reference_out)
    assert (dest / "dense.safetensors").stat().st_ino != old_inode
    assert not dest.with_name("out.replaced").exists() and not dest.with_name("out.partial").exists()
    np.testing.assert_array_equal(held.qtensor("model.norm.weight").data, before)


def test_dest_that_is_not_a_model_is_refused(source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="not an ernie-edge model folder"):
        run(source, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_edge_folder_as_source_is_refused(reference_out, tmp_path):
    with pytest.raises(ConvertError, match="already a converted ernie-edge folder"):
        run(reference_out, tmp_path / "again")


def test_group_size_falls_back_per_tensor(tmp_path):
    """Input widths the recipe's group does not divide fall back per tensor: the expert down
    projections (width 48: no group size divides it) to f16, the rest stay q4/q8 at g64. The
    manifest records it, `info` lists it, and the cpu kernels run every tensor at its format."""
    src = make_source(tmp_path / "src", moe_intermediate_size=48)
    recipe = Recipe(group_size=64)
    out = run(src, tmp_path / "out", recipe=recipe)
    t = read_manifest(out).tensors
    assert (t["layers.01.experts.down"].quant, t["layers.01.experts.down"].group_size) == ("f16", None)
    assert (t["layers.01.experts.gate"].quant, t["layers.01.experts.gate"].group_size) == ("q4", 64)
    assert (t["model.layers.0.self_attn.q_proj.weight"].quant, t["model.layers.0.self_attn.q_proj.weight"].group_size) == ("q8", 64)
    info = describe(out)
    assert info["fallbacks"]["layers.01.experts.down"] == "q4 g64 -> f16 (input width 48)"
    assert "layers.01.experts.gate" not in info["fallbacks"]
    assert "fallback: layers.01.experts.down: q4 g64 -> f16 (input width 48)" in format_description(info)
    ids = [1, 17, 300, 5, 900, 42, 7, 7, 1000]
    ref = Dequantized(HFCheckpoint(src), recipe)
    model = ReferenceModel(ref)
    want = model.forward(ids, model.new_cache()) @ ref.dense("model.embed_tokens.weight").T
    np.testing.assert_allclose(ernie_edge.load(out, backend="reference").logits(ids), want, rtol=0, atol=1e-4)
    fast = ernie_edge.load(out, backend="cpu")
    np.testing.assert_allclose(fast.logits(ids), want, rtol=0, atol=2e-2 * np.abs(want).max())
    cache = fast.new_cache()
    fast.prefill(ids[:-1], cache)
    np.testing.assert_allclose(fast.decode(ids[-1], cache), want[-1], rtol=0, atol=2e-2 * np.abs(want).max())


def test_repo_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        run("baidu/not-here", tmp_path / "out")


# ---- disk full (C2) ------------------------------------------------------------------------------

def test_disk_full(source, reference_out, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    calls = [0]
    original = StreamingWriter.write_chunk

    def write_chunk(self, array):
        calls[0] += "experts-01" in self.path.name
        if calls[0] > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, array)
    monkeypatch.setattr(StreamingWriter, "write_chunk", write_chunk)
    with pytest.raises(ConvertError, match=r"experts-01.safetensors.partial: disk full \(ENOSPC\)"):
        run(source, dest)
    staging = dest.with_name("out.partial")
    assert not dest.exists() and not (staging / "manifest.json").exists()
    assert sorted(p.name for p in staging.iterdir()) == ["dense.safetensors", "progress.json"]
    assert_no_complete_folder(dest)
    monkeypatch.setattr(StreamingWriter, "write_chunk", original)
    assert manifest_bytes(run(source, dest)) == manifest_bytes(reference_out)


def test_disk_full_writing_the_manifest(source, tmp_path, monkeypatch):
    original = convert_mod._atomic_write

    def atomic_write(path, data):
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)
    monkeypatch.setattr(convert_mod, "_atomic_write", atomic_write)
    with pytest.raises(ConvertError, match=r"manifest.json: disk full \(ENOSPC\)"):
        run(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial" / "manifest.json").exists()
    assert_no_complete_folder(tmp_path / "out")


def test_not_enough_space_is_refused_up_front(source, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(ConvertError, match=r"not enough disk space: the conversion needs .* more, 1.00 KB are free"):
        run(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- bad weights (A9) ----------------------------------------------------------------------------

def rewrite_tensor(src: Path, name: str, edit):
    """Rewrite the shard holding `name`, replacing its values by edit(float32 array) (bf16 kept)."""
    from ernie_edge.mmap_store import bf16_to_f32
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    path = src / weight_map[name]
    f = SafetensorsFile(path)
    items = []
    for n, info in f.tensors.items():
        arr = np.array(f.view(n))
        if n == name:
            w = edit(bf16_to_f32(arr))
            arr = (w.view(np.uint32) >> 16).astype(np.uint16)
        items.append((n, info.dtype, arr))
    f.close()
    tmp = path.with_suffix(".tmp")
    w = StreamingWriter(tmp, [PlannedTensor(n, d, a.shape) for n, d, a in items], alignment=8)
    for n, _, a in items:
        w.write(n, a)
    w.close()
    tmp.replace(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight(src_copy, tmp_path, caplog, bad):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"

    def poison(w):
        w[3, 7] = bad
        w[9, 1] = bad
        return w
    rewrite_tensor(src_copy, name, poison)
    with pytest.raises(ConvertError, match=rf"{name}.*non-finite.*at index \[3, 7\]"):
        run(src_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial" / "manifest.json").exists()

    with caplog.at_level(logging.WARNING, logger="ernie_edge.quant.convert"):
        out = run(src_copy, tmp_path / "out", allow_nonfinite=True)
    assert f"tensor '{name}': zeroed 2 non-finite value(s), the first at index [3, 7]" in caplog.text
    w = EdgeCheckpoint(out).expert(2, 5)[1]
    assert w[3, 7] == 0 and w[9, 1] == 0 and np.isfinite(w).all() and np.abs(w).sum() > 0


def test_nonfinite_in_dense_tensor_reports_absolute_row(src_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 64 * 16)  # 16 rows per job
    name = "model.embed_tokens.weight"

    def poison(w):
        w[700, 5] = np.nan
        return w
    rewrite_tensor(src_copy, name, poison)
    with pytest.raises(ConvertError, match=rf"{name}.*at index \[700, 5\]"):
        run(src_copy, tmp_path / "out")


def test_all_zero_group(src_copy, tmp_path):
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"

    def zero(w):
        w[4, :32] = 0.0
        return w
    rewrite_tensor(src_copy, name, zero)
    ckpt = EdgeCheckpoint(run(src_copy, tmp_path / "out"))
    bank = ckpt.expert_bank(1, "gate")
    scales = bank.scales.view(np.float16)
    assert np.isfinite(scales).all()
    assert (ckpt.expert(1, 0)[0][4, :32] == 0).all()
    for name in ckpt.manifest.tensors:  # no non-finite value anywhere in the output
        q = ckpt.qtensor(name)
        assert np.isfinite(q.dequantize()).all(), name


# ---- bad sources (A1-A8, A10) ---------------------------------------------------------------------

def first_shard(src: Path) -> Path:
    return sorted(src.glob("model-*.safetensors"))[0]


def corrupt_truncate(src):
    p = first_shard(src)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p.name, "truncated"


def corrupt_header_length(src):
    p = first_shard(src)
    data = bytearray(p.read_bytes())
    data[:8] = (len(data) + 100).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    return p.name, "runs past the end"


def _edit_header(src, edit):
    p = first_shard(src)
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    p.write_bytes(data[:8] + raw + data[8 + n:])
    return p.name


def corrupt_overlap(src):
    def edit(h):
        names = [k for k in h if k != "__metadata__"]
        h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])
        h[names[1]]["shape"], h[names[1]]["dtype"] = h[names[0]]["shape"], h[names[0]]["dtype"]
    return _edit_header(src, edit), "overlaps|hole"


def corrupt_dtype(src):
    def edit(h):
        h["model.embed_tokens.weight"]["dtype"] = "F128"
    return _edit_header(src, edit), "unknown dtype 'F128'"


def corrupt_missing_expert(src):
    idx_path = src / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    name = "model.layers.2.mlp.experts.3.down_proj.weight"

    shard = idx["weight_map"][name]
    p = src / shard
    f = SafetensorsFile(p)
    items = [(n, i.dtype, np.array(f.view(n))) for n, i in f.tensors.items() if n != name]
    f.close()
    w = StreamingWriter(p.with_suffix(".tmp"), [PlannedTensor(n, d, a.shape) for n, d, a in items], alignment=8)
    for n, _, a in items:
        w.write(n, a)
    w.close()
    p.with_suffix(".tmp").replace(p)
    del idx["weight_map"][name]
    idx_path.write_text(json.dumps(idx))
    return "missing tensor", name


def corrupt_extra_tensor(src):
    p = sorted(src.glob("model-*.safetensors"))[-1]
    f = SafetensorsFile(p)
    items = [(n, i.dtype, np.array(f.view(n))) for n, i in f.tensors.items()]
    f.close()
    items.append(("model.layers.1.mlp.mystery.weight", "F32", np.zeros(8, np.float32)))
    w = StreamingWriter(p.with_suffix(".tmp"), [PlannedTensor(n, d, a.shape) for n, d, a in items], alignment=8)
    for n, _, a in items:
        w.write(n, a)
    w.close()
    p.with_suffix(".tmp").replace(p)
    return "unexpected tensor", "mystery"


def corrupt_index_outside(src):
    idx_path = src / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"]["model.norm.weight"] = "../../etc/passwd.safetensors"
    idx_path.write_text(json.dumps(idx))
    return "model.safetensors.index.json", "not a plain"


def corrupt_config_layers(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**6
    (src / "config.json").write_text(json.dumps(cfg))
    return "config.json", "num_hidden_layers"


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_header_length, corrupt_overlap, corrupt_dtype,
                                     corrupt_missing_expert, corrupt_extra_tensor, corrupt_index_outside,
                                     corrupt_config_layers])
def test_bad_source(src_copy, tmp_path, corrupt):
    a, b = corrupt(src_copy)
    with pytest.raises(ErnieEdgeError) as info:
        run(src_copy, tmp_path / "out")
    msg = str(info.value)
    assert a in msg and any(part in msg for part in b.split("|")), msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


PICKLE_SCRIPT = """
import json, pickle, sys
from pathlib import Path
folder = Path(sys.argv[1])
events = []
sys.addaudithook(lambda event, args: events.append(event) if event.startswith("pickle") else None)
from ernie_edge.errors import ErnieEdgeError
from ernie_edge.quant.convert import ConvertSettings, convert
try:
    convert(ConvertSettings(source=str(folder), dest=folder.parent / "out", progress=False))
    print("CONVERTED")
except ErnieEdgeError as e:
    print("REFUSED", e)
print("EVENTS", events)
print("TORCH", "torch" in sys.modules)
"""


@pytest.mark.parametrize("layout", ["bin_only", "pickle_renamed_safetensors"])
def test_pickle_checkpoint_never_unpickled(tmp_path, layout):
    import pickle

    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(synthetic.make_config("tiny")))
    name = "pytorch_model.bin" if layout == "bin_only" else "model.safetensors"
    (folder / name).write_bytes(pickle.dumps({"w": Payload()}))
    proc = subprocess.run([sys.executable, "-c", PICKLE_SCRIPT, str(folder)], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout
    assert "REFUSED" in out, out + proc.stderr
    assert ("never unpickles" in out) if layout == "bin_only" else ("model.safetensors" in out)
    assert "EVENTS []" in out and "TORCH False" in out
    assert not canary.exists() and not (tmp_path / "out").exists()
