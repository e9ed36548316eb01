"""EdgeCheckpoint and the manifest: zero-copy views, dequantized weights, and refusal of corrupt or
tampered folders: bit flips, truncated or swapped files, bad offsets, unknown versions, and
manifest entries pointing outside the folder (docs/FORMAT.md §3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ernie_edge
from ernie_edge.edge_checkpoint import EdgeCheckpoint
from ernie_edge.errors import CheckpointError, ErnieEdgeError
from ernie_edge.hf_checkpoint import HFCheckpoint
from ernie_edge.manifest import describe, format_description, read_manifest, verify
from ernie_edge.quant import synthetic
from ernie_edge.formats.recipe import Recipe
from ernie_edge.quant.convert import ConvertSettings, convert
from ernie_edge.formats.quant import dequantize_q4, dequantize_q8, quantize_q4
from ernie_edge.quant.safetensors_writer import PlannedTensor, StreamingWriter

TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    src = synthetic.write_checkpoint(tmp_path_factory.mktemp("src"), "tiny", tokenizer=False)
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    # The int8-dense recipe these tests' expected layouts describe (the default's are in test_recipe).
    out = convert(ConvertSettings(source=str(src), dest=tmp_path_factory.mktemp("edge") / "m", progress=False,
                                  recipe=Recipe.from_name("q4g32-d8")))
    return src, out


@pytest.fixture
def folder(edge, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(edge[1], dst)
    return dst


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


# ---- views and weights ---------------------------------------------------------------------------

def test_views_are_read_only_zero_copy(edge):
    ckpt = EdgeCheckpoint(edge[1])
    q = ckpt.qtensor("model.layers.0.self_attn.q_proj.weight")
    assert q.quant == "q8" and q.data.dtype == np.int8 and q.data.shape == (320, 64)
    assert q.scales.dtype == np.uint16 and q.scales.shape == (320, 2) and q.group_size == 32
    assert not q.data.flags.writeable and not q.data.flags.owndata
    bank = ckpt.expert_bank(2, "down")
    assert bank.quant == "q4" and bank.data.shape == (16, 64, 16) and bank.scales.shape == (16, 64, 1)
    assert bank.shape == (16, 64, 32) and bank.bits_per_weight == 4.5
    one = bank.expert(3)
    assert np.shares_memory(one.data, bank.data) and one.shape == (64, 32)
    norm = ckpt.qtensor("model.norm.weight")
    assert norm.quant == "f32" and norm.scales is None and norm.data.dtype == np.float32


def test_dequantized_weights_match_the_spec(edge):
    src, out = edge
    ckpt, hf = EdgeCheckpoint(out), HFCheckpoint(src)
    gate, up, down = ckpt.expert(1, 7)
    w = hf.f32("model.layers.1.mlp.experts.7.up_proj.weight")
    np.testing.assert_array_equal(up, dequantize_q4(*quantize_q4(w, 32), 32))
    assert gate.shape == (32, 64) and down.shape == (64, 32)
    q = ckpt.qtensor("model.embed_tokens.weight")
    np.testing.assert_array_equal(ckpt.dense("model.embed_tokens.weight"),
                                  dequantize_q8(q.data, q.scales.view(np.float16), 32))
    np.testing.assert_array_equal(ckpt.dense("model.layers.1.mlp.gate.weight"),
                                  hf.f32("model.layers.1.mlp.gate.weight"))


def test_load_runs_the_model(edge):
    model = ernie_edge.load(edge[1])
    assert model.location.kind == "edge"
    logits = model.logits([1, 2, 3, 4])
    assert logits.shape == (4, 1024) and np.isfinite(logits).all()


# ---- describe / info -----------------------------------------------------------------------------

def test_describe(edge):
    info = describe(edge[1])
    roles = info["roles"]
    assert roles["expert"]["bits_per_weight"] == 4.5 and roles["expert"]["quant"] == ["q4"]
    assert roles["attn"]["bits_per_weight"] == 8.5 and roles["router"]["bits_per_weight"] == 32.0
    assert info["parameters"] == sum(r["parameters"] for r in roles.values())
    mem = info["memory"]
    per_expert = 3 * (32 * 64 // 2 + 32 * 64 // 32 * 2)
    assert mem["expert_bytes_per_token"] == per_expert * 4 * 2  # 4 experts per token, 2 MoE layers
    assert mem["resident_dense_bytes"] + mem["expert_bytes_total"] < info["total_bytes"]
    assert mem["kv_bytes_per_1k_tokens"] == 2 * 3 * 4 * 16 * 2 * 1000
    text = format_description(info)
    assert "expert" in text and "4.50" in text and "KV cache" in text
    assert "recipe: q4g32-d8 (experts int4, dense 8-bit, group 32)" in text


def test_folders_from_before_per_role_recipes_still_load(edge, folder):
    """A q4g32-d8 / q4g32-d4 folder's manifest holds the three-field recipe every earlier
    ernie-edge wrote (and reads): it loads, describes and runs; per-role recipes only add "roles"."""
    assert read_manifest(edge[1]).recipe == {"expert_bits": 4, "dense_bits": 8, "group_size": 32}
    edit_manifest(folder, lambda m: m.update(recipe={"expert_bits": 4, "dense_bits": 8, "group_size": 32}))
    model = ernie_edge.load(folder)
    assert model.logits([1, 2, 3]).shape == (3, model.config.vocab_size)
    assert describe(folder)["fallbacks"] == {}
    edit_manifest(folder, lambda m: m["recipe"].update(roles={"embed": {"bits": 6}}))
    with pytest.raises(CheckpointError, match="roles"):
        read_manifest(folder)


# ---- verify (C5) ---------------------------------------------------------------------------------

def test_verify_clean(edge):
    assert verify(edge[1]) == []


def test_verify_bit_flip(folder):
    path = folder / "experts-02.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    want = read_manifest(folder).files["experts-02.safetensors"].sha256[:12]
    problems = verify(folder)
    assert len(problems) == 1 and problems[0].startswith("experts-02.safetensors: sha256 mismatch")
    assert f"expected {want}, got " in problems[0]


def test_verify_truncated_swapped_stray(folder):
    (folder / "dense.safetensors").write_bytes((folder / "dense.safetensors").read_bytes()[:-1])
    a, b = folder / "experts-01.safetensors", folder / "experts-02.safetensors"
    tmp = folder / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    shutil.copy(b, folder / "experts-99.safetensors")
    problems = "\n".join(verify(folder))
    assert "dense.safetensors: " in problems and "truncated" in problems
    assert "experts-01.safetensors: sha256 mismatch" in problems
    assert "experts-02.safetensors: sha256 mismatch" in problems
    assert "experts-99.safetensors: not listed" in problems


def test_verify_missing_file(folder):
    (folder / "config.json").unlink()
    assert verify(folder) == ["config.json: missing"]


# ---- corrupt folders are refused at load (A12, C6) -----------------------------------------------

def refused(folder: Path, match: str):
    with pytest.raises(CheckpointError, match=match) as info:
        EdgeCheckpoint(folder)
    return str(info.value)


def test_no_manifest(folder):
    (folder / "manifest.json").unlink()
    refused(folder, "manifest.json: not found.*not a finished")
    with pytest.raises(ErnieEdgeError):
        ernie_edge.load(folder)


def test_staging_folder_refused(folder):
    staging = folder.with_name("m.partial")
    folder.rename(staging)
    refused(staging, "unfinished conversion")


@pytest.mark.parametrize("content, match", [
    (b"", "not valid JSON"), (b"{\"format\"", "not valid JSON"), (b"\xff\xfe{}", "UTF-8"),
    (b"[]", "expected a JSON object"), (b"{}", "format.*not an ernie-edge"),
    (b"[" * 100000, "not valid JSON"),
])
def test_garbage_manifest(folder, content, match):
    (folder / "manifest.json").write_bytes(content)
    refused(folder, match)


def test_unknown_format_version(folder):
    edit_manifest(folder, lambda m: m.update(format_version=3))
    refused(folder, "format_version: 3 was written by a newer ernie-edge.*upgrade")
    edit_manifest(folder, lambda m: m.update(format_version=0))
    refused(folder, "format_version: 0 was written by an older, unsupported ernie-edge")
    edit_manifest(folder, lambda m: m.update(format_version="1"))
    refused(folder, "format_version: must be an integer")


def test_version_1_folders_load(folder):
    """Folders written before tensor layouts (format version 1: every tensor by rows) still load."""
    edit_manifest(folder, lambda m: m.update(format_version=1))
    ckpt = EdgeCheckpoint(folder)
    assert ckpt.manifest.format_version == 1
    assert all(t.layout == "rows" for t in ckpt.manifest.tensors.values())


@pytest.mark.parametrize("layout, version, match", [
    ("tiles8", 2, r"layout: 'tiles8' is not one of \['rows', 'tiles4'\]"),
    ("tiles4", 2, r"layout: q8 \[320, 64\] cannot be stored in tiles4"),
    ("tiles4", 1, "layout: format version 1 has no layouts"),
])
def test_bad_layouts_are_refused(folder, layout, version, match):
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_manifest(folder, lambda m: (m["tensors"][name].update(layout=layout), m.update(format_version=version)))
    refused(folder, match)


def test_duplicate_keys(folder):
    text = (folder / "manifest.json").read_text()
    doubled = text.replace('"format": "ernie-edge",', '"format": "ernie-edge", "format": "ernie-edge",', 1)
    (folder / "manifest.json").write_text(doubled)
    refused(folder, "duplicate key 'format'")


@pytest.mark.parametrize("name", ["../escape.safetensors", "/etc/passwd", "sub/x.safetensors", ".hidden",
                                  "a\x00b", "manifest.json", "x.partial"])
def test_file_name_traversal(folder, name):
    def edit(m):
        m["files"][name] = m["files"].pop("config.json")
    edit_manifest(folder, edit)
    msg = refused(folder, r"files\[")
    assert "\x00" not in msg


def test_case_collision(folder):
    edit_manifest(folder, lambda m: m["files"].update({"CONFIG.json": m["files"]["config.json"]}))
    refused(folder, "differ only in case")


def test_symlink_outside(folder, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.move(folder / "config.json", outside)
    (folder / "config.json").symlink_to(outside)
    refused(folder, "config.json: resolves outside the model folder")
    assert any("outside" in p for p in verify(folder))


def test_file_size_mismatch(folder):
    path = folder / "experts-01.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 64)
    refused(folder, "experts-01.safetensors: .* bytes, manifest.json says .*truncated or replaced")


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00", b"GGUF"])
def test_tiny_file_in_place_of_a_shard(folder, content):
    (folder / "experts-01.safetensors").write_bytes(content)
    edit_manifest(folder, lambda m: m["files"]["experts-01.safetensors"].update(bytes=len(content)))
    refused(folder, "experts-01.safetensors: not a valid safetensors file")


def test_tensor_past_end_of_file(folder):
    """A header claiming more bytes than the file holds (declared offset/size > file size)."""
    path = folder / "experts-02.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-128])
    edit_manifest(folder, lambda m: m["files"]["experts-02.safetensors"].update(bytes=len(data) - 128))
    refused(folder, "experts-02.safetensors: not a valid safetensors file.*truncated")


def test_two_entries_aliasing_bytes(folder):
    path = folder / "dense.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])
    refused(folder, "dense.safetensors: not a valid safetensors file.*(overlaps|hole)")


@pytest.mark.parametrize("field, value, match", [
    ("shape", [64, 65], "shape"), ("dtype", "F16", "dtype"), ("quant", "q3", "quant"),
    ("group_size", 48, "group_size"), ("file", "nope.safetensors", "file"), ("file", ["x"], "file"),
])
def test_tensor_entry_tampered(folder, field, value, match):
    edit_manifest(folder, lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].update({field: value}))
    refused(folder, match)


def test_tensor_table_must_match_config(folder):
    edit_manifest(folder, lambda m: m["tensors"].pop("layers.02.experts.up"))
    refused(folder, r"missing \['layers.02.experts.up'\]")
    edit_manifest(folder, lambda m: m["tensors"].update({"extra": m["tensors"]["model.norm.weight"]}))
    refused(folder, r"unexpected \['extra'\]")


def rewrite_dense(folder: Path, keep=lambda name: True, alignment: int = 64) -> None:
    """Rewrite dense.safetensors with the tensors `keep` accepts, and fix the manifest's size."""
    from ernie_edge.mmap_store import SafetensorsFile
    path = folder / "dense.safetensors"
    f = SafetensorsFile(path)
    items = [(n, i.dtype, np.array(f.view(n))) for n, i in f.tensors.items() if keep(n)]
    f.close()
    w = StreamingWriter(path, [PlannedTensor(n, d, a.shape) for n, d, a in items], alignment=alignment)
    for n, _, a in items:
        w.write(n, a)
    w.close()
    edit_manifest(folder, lambda m: m["files"]["dense.safetensors"].update(bytes=path.stat().st_size))


def test_stored_tensor_missing(folder):
    rewrite_dense(folder, keep=lambda name: name != "model.norm.weight")
    refused(folder, "dense.safetensors: tensor 'model.norm.weight' .*is missing")


def test_misaligned_file(folder):
    rewrite_dense(folder, alignment=4)
    refused(folder, "dense.safetensors: tensor .* not a multiple of 64")


def test_config_in_manifest_validated(folder):
    edit_manifest(folder, lambda m: m["config"].update(num_hidden_layers=10**6))
    refused(folder, "manifest.json.*num_hidden_layers")


def test_bad_recipe(folder):
    edit_manifest(folder, lambda m: m["recipe"].update(group_size=7))
    refused(folder, "manifest.json.*group_size")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3))
def test_manifest_bit_flips_never_crash(edge, tmp_path_factory, flips):
    """A bit flip anywhere in the manifest either still loads (a flip in a digest or a name that
    is still consistent) or is refused with an ErnieEdgeError; never another exception."""
    folder = tmp_path_factory.mktemp("flip") / "m"
    shutil.copytree(edge[1], folder)
    data = bytearray((folder / "manifest.json").read_bytes())
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    (folder / "manifest.json").write_bytes(bytes(data))
    try:
        EdgeCheckpoint(folder)
    except ErnieEdgeError:
        pass


def test_prefetch_maps_when_it_fits_and_skips_when_not(tmp_path, monkeypatch):
    import psutil

    from ernie_edge.edge_checkpoint import EdgeCheckpoint
    from ernie_edge.quant import synthetic
    from ernie_edge.quant.convert import ConvertSettings, convert

    src = synthetic.write_checkpoint(tmp_path / "src", "tiny", layers=2)
    ck = EdgeCheckpoint(convert(ConvertSettings(source=str(src), dest=tmp_path / "edge", progress=False)))
    assert ck.prefetch() is True
    fake = psutil.virtual_memory()._replace(available=1000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    assert ck.prefetch() is False


def test_prefetch_rereads_small_page_files_once_and_stops_when_it_does_not_help(tmp_path, monkeypatch):
    from ernie_edge.edge_checkpoint import EdgeCheckpoint
    from ernie_edge.mmap_store import HUGE_PAGE, SafetensorsFile
    from ernie_edge.quant import synthetic
    from ernie_edge.quant.convert import ConvertSettings, convert

    src = synthetic.write_checkpoint(tmp_path / "src", "tiny", layers=2)
    ck = EdgeCheckpoint(convert(ConvertSettings(source=str(src), dest=tmp_path / "edge", progress=False)))
    assert len(ck.files) >= 2
    dropped = []
    for f in ck.files.values():
        f.file_size = 4 * HUGE_PAGE  # pretend every file is big enough to be worth 2 MiB pages
    monkeypatch.setattr(SafetensorsFile, "drop_cached_pages", lambda self: dropped.append(self.path.name))

    # The OS keeps reporting small pages: the first file is re-read, then no other.
    monkeypatch.setattr(SafetensorsFile, "huge_page_fraction", lambda self, smaps=None: 0.0)
    assert ck.prefetch() is True
    assert dropped == [sorted(ck.files)[0]]

    # Re-reading gives large pages: every small-page file is re-read once.
    dropped.clear()
    state: dict = {}

    def fraction(self, smaps=None):
        return 1.0 if state.get(self.path.name) else 0.1

    def drop(self):
        dropped.append(self.path.name)
        state[self.path.name] = True

    monkeypatch.setattr(SafetensorsFile, "huge_page_fraction", fraction)
    monkeypatch.setattr(SafetensorsFile, "drop_cached_pages", drop)
    assert ck.prefetch() is True
    assert dropped == sorted(ck.files)
    dropped.clear()
    assert ck.prefetch() is True and dropped == []  # already in large pages: nothing re-read

    # Where the OS does not say (None), nothing is re-read.
    monkeypatch.setattr(SafetensorsFile, "huge_page_fraction", lambda self, smaps=None: None)
    assert ck.prefetch() is True and dropped == []
