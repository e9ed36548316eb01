"""A deeper converted edge folder made from a shallower one, for speed benchmarks only.

    .venv/bin/python benchmarks/edge_deepen.py SRC DST --layers 28

The full-width synthetic source at 28 layers is ~50 GB of bf16, more than this machine's disk holds
beside its converted copy. Speed does not depend on the weights' values (random either way), so,
as ../shared/peers' gguf_deepen.py does for llama.cpp's GGUF, the new layers L0 .. N-1 copy the
source's MoE layers 1 .. L0-1 in turn (layer i takes layer 1 + (i - 1) % (L0 - 1)): every layer
gets its own bytes in its own files, so decode streams N layers' weights from memory as the real
model does. The result is a valid edge folder (manifest, checksums, `ernie-edge verify`) whose
config says N layers; its manifest records where it came from.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from ernie_edge.manifest import bank_name, experts_file, sha256_file  # noqa: E402
from ernie_edge.mmap_store import PAD_PREFIX, SafetensorsFile  # noqa: E402
from ernie_edge.quant.safetensors_writer import PlannedTensor, StreamingWriter  # noqa: E402

ALIGNMENT = 64


def source_layer(i: int, layers0: int) -> int:
    return i if i < layers0 else 1 + (i - 1) % (layers0 - 1)


def copy_experts(src: Path, dst: Path, s: int, i: int) -> None:
    """experts-ss as experts-ii: the same bytes, the tensor names' layer number changed (the same
    length, so the header keeps its size and every offset)."""
    with open(src / experts_file(s), "rb") as f, open(dst / experts_file(i), "wb") as out:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        new = raw.replace(f"layers.{s:02d}.experts.".encode(), f"layers.{i:02d}.experts.".encode())
        assert len(new) == len(raw)
        out.write(struct.pack("<Q", n) + new)
        shutil.copyfileobj(f, out, 64 << 20)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def write_dense(src: Path, dst: Path, layers: int, layers0: int) -> None:
    """dense.safetensors with layers 0 .. layers-1, each new layer's tensors copied from its source layer."""
    sf = SafetensorsFile(src / "dense.safetensors", alignment=ALIGNMENT)
    names = [n for n in sf.keys() if not n.startswith(PAD_PREFIX)]
    plan = []  # (new name, source name)
    for n in names:
        if layer_of(n) is None or layer_of(n) < layers0:
            plan.append((n, n))
    for i in range(layers0, layers):
        s = source_layer(i, layers0)
        for n in names:
            if layer_of(n) == s:
                plan.append((n.replace(f"model.layers.{s}.", f"model.layers.{i}.", 1), n))
    tensors = []
    for new, old in plan:
        v = sf.view(old)
        tensors.append(PlannedTensor(new, sf.tensors[old].dtype, tuple(v.shape)))
    w = StreamingWriter(dst / "dense.safetensors", tensors, metadata=sf.metadata, alignment=ALIGNMENT)
    for new, old in plan:
        w.write(new, sf.view(old))
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--layers", type=int, required=True)
    a = ap.parse_args()
    manifest = json.loads((a.src / "manifest.json").read_text())
    cfg = manifest["config"]
    layers0, layers = cfg["num_hidden_layers"], a.layers
    if layers <= layers0 or layers0 < 2 or cfg.get("moe_layer_start_index", 1) != 1:
        sys.exit(f"{a.src}: need a model with MoE layers from 1 and fewer than {layers} layers")
    if a.dst.exists():
        sys.exit(f"{a.dst} exists")
    a.dst.mkdir(parents=True)
    for f in a.src.iterdir():  # tokenizer and generation files as they are
        if f.is_file() and f.name not in ("manifest.json", "config.json", "dense.safetensors") \
                and not f.name.startswith("experts-"):
            shutil.copy2(f, a.dst / f.name)
    write_dense(a.src, a.dst, layers, layers0)
    for i in range(1, layers):
        copy_experts(a.src, a.dst, source_layer(i, layers0), i)
        print(f"layer {i}: experts of layer {source_layer(i, layers0)}", flush=True)
    cfg = dict(cfg, num_hidden_layers=layers, moe_layer_end_index=layers - 1)
    (a.dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {}
    for name, entry in manifest["tensors"].items():
        i = layer_of(name)
        tensors[name] = entry
        if i is not None and i >= 1:
            for j in range(layers0, layers):
                if source_layer(j, layers0) == i:
                    tensors[name.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)] = entry
    for i in range(layers0, layers):
        s = source_layer(i, layers0)
        for proj in ("gate", "up", "down"):
            tensors[bank_name(i, proj)] = dict(manifest["tensors"][bank_name(s, proj)], file=experts_file(i))
    files = {}
    for name in manifest["files"]:
        if name.startswith("experts-") or name in ("dense.safetensors", "config.json"):
            continue
        files[name] = manifest["files"][name]
    for f in sorted(a.dst.iterdir()):
        if f.name.startswith("experts-") or f.name in ("dense.safetensors", "config.json"):
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest.update(config=cfg, tensors=tensors, files=files,
                    source=dict(manifest["source"], deepened_from=str(a.src), note="benchmark only: layers copied"))
    (a.dst / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {a.dst}: {layers} layers")


if __name__ == "__main__":
    main()
