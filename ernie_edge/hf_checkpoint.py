"""Read a Hugging Face ERNIE-4.5 MoE checkpoint folder (bf16 safetensors shards) directly.

Used by the reference path (`ernie_edge.load(hf_folder)`) and by the converter. Every shard is
validated by mmap_store; the index may only name plain `.safetensors` basenames inside the folder;
every tensor is checked against the config (names, shapes, floating dtypes); pickle checkpoints are
refused without being opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ErnieConfig
from .errors import CheckpointError
from .mmap_store import SafetensorsFile, TensorInfo, to_f32
from .formats.hf_ernie import TensorSpec, check_names, check_shape, expected_tensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Widened fp32 copies are cached when the whole model fits in this much memory (tiny/small test
# models); larger models are widened tensor by tensor on every use.
CACHE_LIMIT_BYTES = 2 << 30


def shard_names(folder: Path) -> list[str]:
    """The shard file names of an HF folder, from its index (validated) or the single file."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: cannot read the shard index: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: 'weight_map' is missing or empty")
        names = []
        for tensor, fname in weight_map.items():
            _check_shard_name(folder, index_path, tensor, fname)
            if fname not in names:
                names.append(fname)
        return names
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder}: unsupported format: only pickle checkpoints ({', '.join(pickles[:3])}) "
                              "were found. ernie-edge never unpickles files (arbitrary code execution); "
                              "use the safetensors release of the model")
    raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}: not a safetensors checkpoint")


def _check_shard_name(folder: Path, index_path: Path, tensor, fname) -> None:
    if not isinstance(fname, str):
        raise CheckpointError(f"{index_path}: weight_map[{tensor!r}] is not a string")
    safe = fname.encode("unicode_escape").decode("ascii")[:200]
    if ("\0" in fname or "/" in fname or "\\" in fname or fname in (".", "..")
            or not fname.endswith(".safetensors") or os.path.isabs(fname)):
        raise CheckpointError(f"{index_path}: weight_map[{tensor!r}] = {safe!r} is not a plain "
                              "'.safetensors' file name in the checkpoint folder")
    target = (folder / fname)
    if not target.is_file():
        raise CheckpointError(f"{index_path}: shard {safe!r} (for {tensor!r}) is missing")
    real, root = os.path.realpath(target), os.path.realpath(folder)
    if folder.parent.name == "snapshots":
        # An HF cache snapshot: its files are symlinks into the repo's blobs/ folder.
        root = os.path.realpath(folder.parent.parent)
    if os.path.commonpath([real, root]) != root:
        raise CheckpointError(f"{index_path}: shard {safe!r} resolves outside the checkpoint folder")


class HFCheckpoint:
    """A validated HF checkpoint: config, tensor table, and float32 access by HF name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = ErnieConfig.from_file(self.folder / "config.json")
        self.shards = {name: SafetensorsFile(self.folder / name) for name in shard_names(self.folder)}
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}
        for fname, f in self.shards.items():
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} is stored in both "
                                          f"{self.tensors[name][0]} and {fname}")
                self.tensors[name] = (fname, info)
        self.skipped = check_names(self.config, self.tensors.keys(), str(self.folder))
        self.specs: dict[str, TensorSpec] = expected_tensors(self.config)
        for name, spec in self.specs.items():
            fname, info = self.tensors[name]
            check_shape(spec, info.shape, f"{self.folder / fname}")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.folder / fname}: tensor {name!r} has dtype {info.dtype}; "
                                      f"expected one of {', '.join(FLOAT_DTYPES)}")
        fp32_bytes = 4 * sum(int(np.prod(s.shape)) for s in self.specs.values())
        self._cache: dict[str, np.ndarray] | None = {} if fp32_bytes <= CACHE_LIMIT_BYTES else None

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """The read-only mmap view of a tensor and its safetensors dtype (BF16 as uint16 bits)."""
        fname, info = self.tensors[name]
        return self.shards[fname].view(name), info.dtype

    def f32(self, name: str) -> np.ndarray:
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        arr, dtype = self.raw(name)
        out = to_f32(arr, dtype)
        if self._cache is not None:
            self._cache[name] = out
        return out

    # WeightSource
    def dense(self, name: str) -> np.ndarray:
        return self.f32(name)

    def expert(self, layer: int, e: int):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return tuple(self.f32(p + f"{n}_proj.weight") for n in ("gate", "up", "down"))

    def total_bytes(self) -> int:
        return sum(f.file_size for f in self.shards.values())
