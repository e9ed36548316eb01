"""Bad HF checkpoints give a clear error naming the file and tensor."""

import json
import shutil

import numpy as np
import pytest

import ernie_edge
from ernie_edge.errors import CheckpointError, ConfigError, ErnieEdgeError, ModelNotFoundError
from ernie_edge.quant import synthetic
from ernie_edge.quant.safetensors_writer import PlannedTensor, StreamingWriter


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("good"), "tiny", layers=2, tokenizer=False)


@pytest.fixture
def ckpt(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_loads_and_skips_mtp(ckpt):
    model = ernie_edge.load(ckpt)
    skipped = model.weights.skipped
    assert skipped and all(name.startswith("model.mtp_") for name in skipped)
    assert model.logits([1, 2, 3]).shape == (3, model.config.vocab_size)


def test_missing_shard(ckpt):
    shards(ckpt)[-1].unlink()
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002.safetensors'.*missing"):
        ernie_edge.load(ckpt)


def test_truncated_shard(ckpt):
    path = shards(ckpt)[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path.name}.*truncated"):
        ernie_edge.load(ckpt)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                    "x.bin", "a\x00.safetensors", 7])
def test_index_pointing_outside(ckpt, target):
    idx = index(ckpt)
    idx["weight_map"]["model.norm.weight"] = target
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        ernie_edge.load(ckpt)


def test_symlinked_shard_outside(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shards(ckpt)[1], outside)
    (ckpt / "model-00002-of-00002.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        ernie_edge.load(ckpt)


def test_other_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "qwen3_moe", ["Qwen3MoeForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json.*qwen3_moe"):
        ernie_edge.load(ckpt)


def _rewrite_shard(folder, edit):
    """Rewrite the first shard through `edit(name, array, dtype) -> (name, array, dtype) | None`."""
    from ernie_edge.mmap_store import SafetensorsFile
    path = shards(folder)[0]
    src = SafetensorsFile(path)
    items = []
    for name, info in src.tensors.items():
        out = edit(name, np.array(src.view(name)), info.dtype)
        if out is not None:
            items.append(out)
    src.close()
    tmp = path.with_suffix(".tmp")
    w = StreamingWriter(tmp, [PlannedTensor(n, d, a.shape) for n, a, d in items], alignment=8)
    for n, a, _ in items:
        w.write(n, a)
    w.close()
    tmp.replace(path)
    idx = index(folder)
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k in {n for n, _, _ in items}
                         or v != path.name}
    for n, _, _ in items:
        idx["weight_map"][n] = path.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_shard(ckpt, lambda n, a, d: (n, a[:, :-1].copy() if n == name else a, d))
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*shape"):
        ernie_edge.load(ckpt)


def test_wrong_dtype(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_shard(ckpt, lambda n, a, d: (n, a.astype(np.int32), "I32") if n == name else (n, a, d))
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*dtype I32"):
        ernie_edge.load(ckpt)


def test_missing_tensor(ckpt):
    name = "model.layers.0.input_layernorm.weight"
    _rewrite_shard(ckpt, lambda n, a, d: None if n == name else (n, a, d))
    with pytest.raises(CheckpointError, match=r"missing tensor.*input_layernorm"):
        ernie_edge.load(ckpt)


def test_unexpected_tensor(ckpt):
    from ernie_edge.mmap_store import SafetensorsFile  # add one unknown tensor to shard 2
    path = shards(ckpt)[1]
    src = SafetensorsFile(path)
    items = [(n, np.array(src.view(n)), i.dtype) for n, i in src.tensors.items()]
    src.close()
    items.append(("model.layers.0.mystery.weight", np.zeros(4, np.float32), "F32"))
    w = StreamingWriter(path.with_suffix(".tmp"), [PlannedTensor(n, d, a.shape) for n, a, d in items], alignment=8)
    for n, a, _ in items:
        w.write(n, a)
    w.close()
    path.with_suffix(".tmp").replace(path)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*mystery"):
        ernie_edge.load(ckpt)


def test_pickle_checkpoint_refused_without_unpickling(tmp_path):
    import pickle
    import sys

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(synthetic.make_config("tiny")))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    events = []
    hook = lambda event, args: events.append(event) if event.startswith("pickle") else None  # noqa: E731
    sys.addaudithook(hook)
    with pytest.raises(CheckpointError, match="never unpickles"):
        ernie_edge.load(folder)
    assert "pickle.find_class" not in events


def test_unknown_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        ernie_edge.load(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        ernie_edge.load("baidu/no-such-model-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither"):
        ernie_edge.load(tmp_path / "empty")


def test_repo_id_resolves_in_hf_cache(good, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--baidu--ERNIE-4.5-21B-A3B-Thinking"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    # As huggingface_hub lays it out: snapshot files are relative symlinks into blobs/.
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in good.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = ernie_edge.load("baidu/ERNIE-4.5-21B-A3B-Thinking")
    assert model.location.revision == "abc123"


@pytest.mark.parametrize("ids, match", [([], "non-empty"), ([[1, 2]], "1-D"), ([1.5], "integers"),
                                        ([1, 5000], r"token_ids\[1\] = 5000")])
def test_bad_token_ids(good, ids, match):
    model = ernie_edge.load(good)
    with pytest.raises(ErnieEdgeError, match=match):
        model.logits(ids)
