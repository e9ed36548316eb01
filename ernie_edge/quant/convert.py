"""The converter: a Hugging Face ERNIE-4.5 MoE checkpoint -> an edge model folder (docs/FORMAT.md).

    convert(ConvertSettings(source="baidu/ERNIE-4.5-21B-A3B-Thinking"))

Streaming: one tensor (in row chunks) or one expert at a time is widened from bf16, quantized and
written, so peak memory does not grow with the model. Quantization runs on `threads` workers
(numpy and the numba quantizers release the GIL); results are written in a fixed order, so the
output is byte-identical for any thread count.

Crash safety (tests/test_convert.py kills it at every step): everything is written into `DST.partial/`, each file first as
`NAME.partial`, renamed once complete and fsynced; `progress.json` there records each finished file
with its sha256. A rerun after Ctrl-C or kill -9 re-verifies the finished files and redoes the
rest. The manifest is written last, then the staging folder is renamed to DST and the parent
directory fsynced. No file holds a timestamp: the same input gives the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ernie_edge import __version__
from ernie_edge.errors import ErnieEdgeError, ModelNotFoundError
from ernie_edge.hf_checkpoint import HFCheckpoint, shard_names
from ernie_edge.manifest import (DENSE_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, PROJECTIONS,
                                 bank_name, experts_file, format_size, read_manifest, sha256_file, verify)
from ernie_edge.mmap_store import to_f32
from ernie_edge.model_dir import resolve
from ernie_edge.paths import models_dir, share_file

from ..formats.layout import ROWS, TILE_ROWS, TILES4, storage_layout, tile_rows
from ..formats.quant import FP16_MAX, QuantizationError
from ..formats.budget import recipe_storage
from ..formats.table import get_format
from ..formats.recipe import Recipe
from .safetensors_writer import PlannedTensor, StreamingWriter, encode_header, plan_layout

log = logging.getLogger(__name__)

CREATED_BY = f"ernie-edge {__version__}"
PROGRESS_NAME = "progress.json"
PARTIAL = ".partial"
REPLACED = ".replaced"
ALIGNMENT = 64
HEADER_METADATA = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
# Files copied verbatim when the source has them (config.json is required).
COPY_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")
MAX_COPY_BYTES = 64 << 20
CHUNK_ELEMENTS = 1 << 22  # elements per quantization job of a dense tensor (16 MB as fp32)


class ConvertError(ErnieEdgeError):
    """The conversion cannot proceed: bad weights, a destination conflict, disk full, ..."""


@dataclass(frozen=True)
class ConvertSettings:
    """What `ernie-edge convert` was asked to do.

    source: an HF checkpoint folder or a repo id (local HF cache; downloaded only when online).
    dest: the edge folder to write (default: models_dir() / NAME-TAG, e.g. ...-q4g128-d6-s5g32).
    threads: quantization workers (0: all cores). allow_nonfinite: zero NaN/Inf weights (reported)
    instead of failing."""

    source: str
    dest: Path | None = None
    recipe: Recipe = field(default_factory=Recipe.default)
    force: bool = False
    threads: int = 0
    progress: bool = True
    allow_nonfinite: bool = False


def recipe_tag(recipe: Recipe) -> str:
    """A short name for a recipe, used in default folder names: q4g128-d6-s5g32."""
    return recipe.name


def default_dest(source_name: str, recipe: Recipe) -> Path:
    return models_dir() / f"{source_name}-{recipe_tag(recipe)}"


def _hook(event: str) -> None:
    """Called after each durable step ("file:NAME", "manifest", "finalized", "renamed"); tests
    patch it to interrupt the conversion there."""


# ---- the plan: which files, which tensors ---------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One piece of work: rows [row0, row1) of a source tensor (or a whole expert tensor)."""

    hf_name: str
    row0: int
    row1: int
    expert_axis: bool  # add a leading expert axis of 1 (chunks of an expert bank)


@dataclass
class OutTensor:
    """One logical output tensor and the jobs that produce it, in order."""

    name: str
    quant: str
    shape: tuple[int, ...]
    group_size: int | None
    jobs: list[Job]
    layout: str = ROWS

    def planned(self) -> list[PlannedTensor]:
        fmt = get_format(self.quant)
        data_shape, scales_shape = fmt.stored_shapes(self.shape, self.group_size)
        data_name, scales_name = fmt.stored_names(self.name)
        out = [PlannedTensor(data_name, fmt.dtype, data_shape)]
        if scales_name:
            out.append(PlannedTensor(scales_name, "F16", scales_shape))
        return out

    def entry(self, file: str) -> dict:
        entry = {"file": file, "dtype": get_format(self.quant).dtype, "shape": list(self.shape),
                 "quant": self.quant, "group_size": self.group_size}
        return entry if self.layout == ROWS else {**entry, "layout": self.layout}


@dataclass
class OutFile:
    name: str
    tensors: list[OutTensor] = field(default_factory=list)  # empty for copied files
    copy_from: Path | None = None
    source_bytes: int = 0

    def planned(self) -> list[PlannedTensor]:
        return [p for t in self.tensors for p in t.planned()]

    def expected_bytes(self) -> int:
        if self.copy_from is not None:
            return self.copy_from.stat().st_size
        layout = plan_layout(self.planned(), ALIGNMENT)
        return len(encode_header(layout, HEADER_METADATA, ALIGNMENT)) + sum(t.nbytes for t in layout)


def _row_jobs(name: str, shape: tuple[int, ...]) -> list[Job]:
    """Jobs of whole 4-row tiles (formats/layout.py) of about CHUNK_ELEMENTS each."""
    rows = shape[0] if len(shape) > 1 else 1
    row_size = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else shape[0]
    step = max(TILE_ROWS, CHUNK_ELEMENTS // max(1, row_size) // TILE_ROWS * TILE_ROWS)
    return [Job(name, r, min(r + step, rows), False) for r in range(0, rows, step)]



def plan_files(ckpt: HFCheckpoint, recipe: Recipe) -> list[OutFile]:
    """The output files in writing order: dense.safetensors, experts-LL.safetensors per MoE layer.

    A tensor whose input width the recipe's group size does not divide falls back on its own
    (formats.table.choose_storage: another group size that divides, else f16); the manifest
    records each tensor's format and group, and `ernie-edge info` lists the fallbacks."""
    cfg = ckpt.config
    nbytes = {name: info.nbytes for name, (_, info) in ckpt.tensors.items()}

    def storage(spec) -> tuple[str, int | None, str]:  # format, group size, layout (formats/layout.py)
        quant, group = recipe_storage(recipe, spec)
        return quant, group, storage_layout(get_format(quant).bits, spec.shape)

    dense = OutFile(DENSE_FILE)
    for name, spec in ckpt.specs.items():
        if spec.role == "expert":
            continue
        quant, group, layout = storage(spec)
        dense.tensors.append(OutTensor(name, quant, spec.shape, group, _row_jobs(name, spec.shape), layout))
        dense.source_bytes += nbytes[name]
    files = [dense]
    for layer in cfg.moe_layers:
        out = OutFile(experts_file(layer))
        for proj in PROJECTIONS:
            names = [f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight" for e in range(cfg.moe_num_experts)]
            spec = ckpt.specs[names[0]]
            quant, group, layout = storage(spec)
            jobs = [Job(n, 0, spec.shape[0], True) for n in names]
            out.tensors.append(OutTensor(bank_name(layer, proj), quant, (len(names), *spec.shape), group, jobs, layout))
            out.source_bytes += sum(nbytes[n] for n in names)
        files.append(out)
    return files


@dataclass
class _TokenizerFile(OutFile):
    build_from: Path | None = None  # tokenizer.json is built from this folder's tokenizer.model


def plan_copies(src: Path) -> list[OutFile]:
    """config / tokenizer files copied verbatim, then tokenizer.json (copied, or built from
    tokenizer.model when the source has none)."""
    out = [_copy(src / name) for name in COPY_FILES if (src / name).is_file()]
    if (src / "tokenizer.json").is_file():
        return out + [_copy(src / "tokenizer.json")]
    if (src / "tokenizer.model").is_file():
        return out + [_TokenizerFile("tokenizer.json", build_from=src)]
    raise ConvertError(f"{src}: no tokenizer.json or tokenizer.model; a model folder needs its tokenizer")


def _copy(path: Path) -> OutFile:
    size = path.stat().st_size
    if size > MAX_COPY_BYTES:
        raise ConvertError(f"{path}: {size} bytes is too large for a {path.name} (limit {MAX_COPY_BYTES}); "
                           "refusing to copy it")
    return OutFile(path.name, copy_from=path)


# ---- encoding one job ----------------------------------------------------------------------------

@dataclass
class Encoded:
    data: np.ndarray
    scales: np.ndarray | None
    nonfinite: int = 0
    first_bad: tuple[int, ...] | None = None


def encode(w: np.ndarray, quant: str, group_size: int | None, name: str, offset: int = 0,
           allow_nonfinite: bool = False) -> Encoded:
    """float32 rows of tensor `name` (its first row is row `offset` of the tensor) -> the stored
    codes + fp16 scales (q4/q8) or values (f16/f32).

    NaN/Inf is a ConvertError naming the tensor and the first bad index, unless allow_nonfinite:
    then such values are zeroed and counted."""
    def where(index) -> list[int]:
        index = [int(i) for i in index]
        if w.ndim > 1:
            index[0] += offset
        return index

    bad = ~np.isfinite(w)
    count, first = 0, None
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), w.shape)
        first = tuple(where(index))
        if not allow_nonfinite:
            raise ConvertError(f"tensor {name!r}: non-finite value {w[index]} at index {list(first)}; "
                               "the checkpoint is corrupt (--allow-nonfinite zeroes such values and "
                               "reports them)")
        count = int(bad.sum())
        w = np.where(bad, np.float32(0.0), w)
    fmt = get_format(quant)
    if fmt.grouped:
        try:
            data, scales = fmt.quantize(w, group_size)
        except QuantizationError as e:
            raise ConvertError(f"tensor {name!r}: cannot quantize to {quant} at index {where(e.index)}: "
                               f"{e}") from None
        return Encoded(data, scales, count, first)
    if quant == "f16":
        big = np.abs(w) > FP16_MAX
        if big.any():
            index = np.unravel_index(int(np.argmax(big)), w.shape)
            raise ConvertError(f"tensor {name!r}: value {w[index]} at index {where(index)} overflows "
                               "float16; use --dense-bits 8")
    return Encoded(fmt.quantize(w, None)[0], None, count, first)


# ---- the conversion ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    path: Path
    repo: str | None
    revision: str | None


def resolve_source(source: str) -> Source:
    """An HF folder, or a repo id in the local HF cache (downloaded only when online)."""
    try:
        loc = resolve(source)
    except ModelNotFoundError:
        path = _download(source)
        if path is None:
            raise
        loc = resolve(path)
        return Source(Path(path).resolve(), source.partition("@")[0], Path(path).name)
    if loc.kind != "hf":
        raise ConvertError(f"{loc.path}: is already a converted ernie-edge folder; convert the "
                           "Hugging Face checkpoint it came from")
    return Source(loc.path.resolve(), loc.repo_id, loc.revision)


def _download(source: str) -> str | None:
    """snapshot_download a repo id when huggingface_hub is installed and we are online."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return None
    if source.count("/") != 1 or Path(source).expanduser().exists():
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    repo, _, revision = source.partition("@")
    try:
        return snapshot_download(repo, revision=revision or None,
                                 allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except Exception as e:  # network, auth, not found: all "could not get the model"
        raise ConvertError(f"{source}: not in the local Hugging Face cache and the download failed: {e}") from None


def convert(settings: ConvertSettings) -> Path:
    """Convert `settings.source` into an edge folder and return its path (see the module doc)."""
    src = resolve_source(settings.source)
    ckpt = HFCheckpoint(src.path)
    files = plan_files(ckpt, settings.recipe) + plan_copies(src.path)
    name = src.repo.split("/")[-1] if src.repo else src.path.name
    dest = Path(settings.dest if settings.dest is not None else default_dest(name, settings.recipe))
    dest = dest.expanduser().absolute()
    if dest.resolve() == src.path:
        raise ConvertError(f"{dest}: the destination is the source folder; choose another DST")
    job = _Conversion(settings, src, ckpt, files, dest)
    return job.run()


class _Conversion:
    """One run of `convert`: destination checks, the staging folder (create, lock, resume), writing
    the files, the manifest, and the final rename."""

    def __init__(self, settings: ConvertSettings, src: Source, ckpt: HFCheckpoint, files: list[OutFile],
                 dest: Path):
        self.s = settings
        self.src = src
        self.ckpt = ckpt
        self.files = files
        self.dest = dest
        self.staging = dest.with_name(dest.name + PARTIAL)
        self.replaced = dest.with_name(dest.name + REPLACED)
        self.done: dict[str, dict] = {}
        self.nonfinite: dict[str, tuple[int, tuple]] = {}
        self.threads = settings.threads or os.cpu_count() or 1
        self.bar = None
        self._lock_fd: int | None = None

    # ---- top level --------------------------------------------------------------------------

    def run(self) -> Path:
        try:
            return self._run()
        except OSError as e:  # anything not already turned into a ConvertError where it happened
            raise _os_error(e, Path(e.filename) if e.filename else self.staging) from None
        finally:
            self._unlock_staging()

    def _run(self) -> Path:
        self._check_dest()
        if self.staging.is_dir():
            self._lock_staging()
        if self._staging_is_finalized():
            self._finish()
            return self.dest
        self._open_staging()
        todo = [f for f in self.files if f.name not in self.done]
        self._check_space(todo)
        self.bar = _progress_bar(sum(f.source_bytes for f in self.files),
                                 sum(f.source_bytes for f in self.files if f.name in self.done), self.s.progress)
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                for f in todo:
                    self._write(f, pool)
        finally:
            if self.bar is not None:
                self.bar.close()
        self._report_nonfinite()
        self._write_manifest()
        self._finish()
        return self.dest

    def _check_dest(self) -> None:
        if self.replaced.exists() and self.dest.exists():
            shutil.rmtree(self.replaced)  # left by an interrupted --force swap
        if self.dest.exists():
            if not (self.dest / MANIFEST_NAME).is_file():
                raise ConvertError(f"{self.dest}: exists and is not an ernie-edge model folder; "
                                   "choose another DST or remove it")
            if not self.s.force:
                raise ConvertError(f"{self.dest}: a converted model is already there; pass --force to "
                                   "replace it (the old folder stays usable until the new one is complete)")

    # ---- staging folder ---------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        """What the staging folder was made from: a rerun resumes only if this is unchanged."""
        h = hashlib.sha256()
        folder = self.src.path
        names = ["config.json", "model.safetensors.index.json"] + shard_names(folder) \
            + [f.name for f in self.files if f.copy_from is not None]
        for name in names:
            path = folder / name
            if not path.is_file():
                continue
            st = path.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            with open(path, "rb") as fobj:
                h.update(fobj.read(1 << 16))  # the header of a shard, or a whole small file
        return {"source": self._source_dict(), "inputs_sha256": h.hexdigest(),
                "recipe": self.s.recipe.to_dict(),
                "created_by": CREATED_BY, "format_version": FORMAT_VERSION}

    def _source_dict(self) -> dict:
        return {"repo": self.src.repo, "revision": self.src.revision, "path": str(self.src.path)}

    def _open_staging(self) -> None:
        fingerprint = self._fingerprint()
        progress_path = self.staging / PROGRESS_NAME
        if not self.staging.exists():
            self.staging.mkdir(parents=True)
            _fsync_dir(self.staging.parent)
            self._lock_staging()
        elif not self.staging.is_dir():
            raise ConvertError(f"{self.staging}: exists and is not a folder; remove it")
        elif progress_path.is_file():
            recorded = _read_progress(progress_path)
            if recorded.get("fingerprint") != fingerprint:
                raise ConvertError(f"{self.staging}: an unfinished conversion of a different source, recipe "
                                   f"or ernie-edge version; delete {self.staging} to start over")
            self._resume(recorded.get("files", {}))
        elif any(self.staging.iterdir()):
            raise ConvertError(f"{self.staging}: exists but was not made by ernie-edge convert "
                               f"(no {PROGRESS_NAME}); delete it or choose another DST")
        self.fingerprint = fingerprint
        self._save_progress()

    def _lock_staging(self) -> None:
        """Hold an exclusive lock on the staging folder for this process's lifetime, so that two
        conversions never write the same folder (the lock follows the folder through the rename)."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent conversions are the user's problem
            return
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConvertError(f"{self.staging}: another ernie-edge convert is writing this folder; "
                               "wait for it to finish") from None
        self._lock_fd = fd

    def _unlock_staging(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _resume(self, recorded: dict) -> None:
        """Keep recorded files whose size and sha256 still match; remove everything else."""
        planned = {f.name for f in self.files}
        for path in sorted(self.staging.iterdir()):
            if path.name == PROGRESS_NAME:
                continue
            entry = recorded.get(path.name)
            keep = (entry is not None and path.name in planned and path.is_file()
                    and path.stat().st_size == entry.get("bytes")
                    and sha256_file(path) == entry.get("sha256"))
            if keep:
                self.done[path.name] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
            elif path.is_dir() and not path.is_symlink():
                raise ConvertError(f"{path}: unexpected folder inside the staging folder; delete {self.staging}")
            else:
                path.unlink()
        if self.done:
            log.info("resuming %s: %d of %d files already done", self.staging, len(self.done), len(self.files))

    def _save_progress(self) -> None:
        data = {"format": "ernie-edge-progress", "fingerprint": self.fingerprint, "files": self.done}
        _atomic_write(self.staging / PROGRESS_NAME, json.dumps(data, indent=1).encode())

    def _check_space(self, todo: list[OutFile]) -> None:
        need = sum(f.expected_bytes() for f in todo if not isinstance(f, _TokenizerFile))
        free = shutil.disk_usage(self.staging).free
        if need > free:
            raise ConvertError(f"{self.staging}: not enough disk space: the conversion needs "
                               f"{format_size(need)} more, {format_size(free)} are free; free some space "
                               "and run the same command again (finished files are kept)")

    # ---- writing one file -------------------------------------------------------------------

    def _write(self, f: OutFile, pool: ThreadPoolExecutor) -> None:
        final = self.staging / f.name
        partial = self.staging / (f.name + PARTIAL)
        try:
            if isinstance(f, _TokenizerFile):
                from ernie_edge.tokenizer import build_tokenizer_json
                build_tokenizer_json(f.build_from, partial)
                share_file(partial)  # written through mkstemp (0600): give it the umask's mode
                _fsync_file(partial)
            elif f.copy_from is not None:
                shutil.copyfile(f.copy_from, partial)
                _fsync_file(partial)
            else:
                self._write_tensors(f, partial, pool)
            digest = sha256_file(partial)
            size = partial.stat().st_size
            os.replace(partial, final)
            _fsync_dir(self.staging)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise _os_error(e, partial) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.done[f.name] = {"bytes": size, "sha256": digest}
        self._save_progress()
        _hook(f"file:{f.name}")

    def _write_tensors(self, f: OutFile, path: Path, pool: ThreadPoolExecutor) -> None:
        writer = StreamingWriter(path, f.planned(), metadata=HEADER_METADATA, alignment=ALIGNMENT)
        try:
            for t in f.tensors:
                self._write_tensor(writer, t, pool)
            writer.close(fsync=True)
        except BaseException:
            writer.abort()
            raise

    def _write_tensor(self, writer: StreamingWriter, t: OutTensor, pool: ThreadPoolExecutor) -> None:
        data_name, scales_name = get_format(t.quant).stored_names(t.name)
        if self.bar is not None:
            self.bar.set_postfix_str(t.name, refresh=False)
        last_job = {job.hf_name: i for i, job in enumerate(t.jobs)}
        work = [lambda job=job: self._encode(job, t) for job in t.jobs]
        writer.begin(data_name)
        scales = []
        for i, (job, enc) in enumerate(zip(t.jobs, _ordered(pool, work, 2 * self.threads))):
            writer.write_chunk(enc.data)
            if enc.scales is not None:
                scales.append(enc.scales)
            if enc.nonfinite:
                count, first = self.nonfinite.get(job.hf_name, (0, enc.first_bad))
                self.nonfinite[job.hf_name] = (count + enc.nonfinite, first)
            if last_job[job.hf_name] == i:
                self._release(job.hf_name)
        writer.end()
        if scales_name is not None:
            writer.write(scales_name, np.concatenate(scales, axis=0))

    def _encode(self, job: Job, t: OutTensor) -> Encoded:
        raw, dtype = self.ckpt.raw(job.hf_name)
        if raw.ndim > 1:
            raw = raw[job.row0:job.row1]
        enc = encode(to_f32(raw, dtype), t.quant, t.group_size, job.hf_name, job.row0, self.s.allow_nonfinite)
        if t.layout == TILES4:  # a job is whole tiles (`_row_jobs`, or a whole expert)
            enc.data = tile_rows(enc.data, get_format(t.quant).bits)
        if job.expert_axis:  # one expert of a bank: [1, O, ...]
            enc.data = enc.data[None]
            enc.scales = None if enc.scales is None else enc.scales[None]
        if self.bar is not None:
            self.bar.update(raw.nbytes)
        return enc

    def _release(self, hf_name: str) -> None:
        """Drop a consumed source tensor's pages from our mapping (RSS), not from the page cache."""
        fname, _ = self.ckpt.tensors[hf_name]
        if hasattr(mmap, "MADV_DONTNEED"):
            self.ckpt.shards[fname].advise(hf_name, mmap.MADV_DONTNEED)

    def _report_nonfinite(self) -> None:
        for name, (count, first) in sorted(self.nonfinite.items()):
            msg = f"tensor {name!r}: zeroed {count} non-finite value(s), the first at index {list(first)}"
            log.warning(msg)
            if self.s.progress:
                print(f"warning: {msg}")

    # ---- finishing --------------------------------------------------------------------------

    def _manifest(self) -> dict:
        tensors = {}
        for f in self.files:
            for t in f.tensors:
                tensors[t.name] = t.entry(f.name)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": self._source_dict(),
            "config": json.loads((self.src.path / "config.json").read_text(encoding="utf-8")),
            "recipe": self.s.recipe.to_dict(),
            "tensors": tensors,
            "files": {f.name: self.done[f.name] for f in self.files},
            "skipped": dict(sorted(self.ckpt.skipped.items())),
            "created_by": CREATED_BY,
        }

    def _write_manifest(self) -> None:
        _atomic_write(self.staging / MANIFEST_NAME, json.dumps(self._manifest(), indent=1).encode())
        _hook("manifest")
        (self.staging / PROGRESS_NAME).unlink()
        _fsync_dir(self.staging)
        _hook("finalized")

    def _staging_is_finalized(self) -> bool:
        """A staging folder whose manifest was written but that was not yet renamed (killed in the
        last step): finish it if it is this conversion's and still verifies."""
        if not (self.staging / MANIFEST_NAME).is_file() or (self.staging / PROGRESS_NAME).exists():
            return False
        m = read_manifest(self.staging)
        if (m.source != self._source_dict() or m.recipe != self.s.recipe.to_dict()
                or m.created_by != CREATED_BY or set(m.files) != {f.name for f in self.files}):
            raise ConvertError(f"{self.staging}: a finished conversion of a different source or recipe "
                               f"was left here; delete {self.staging} to start over")
        problems = verify(self.staging)
        if problems:
            raise ConvertError(f"{self.staging}: left by an interrupted conversion and damaged "
                               f"({problems[0]}); delete it to start over")
        return True

    def _finish(self) -> None:
        """Move the finished staging folder to DST (replacing an old DST only with --force)."""
        parent = self.dest.parent
        if self.dest.exists():
            self._check_dest()
            os.replace(self.dest, self.replaced)
        os.replace(self.staging, self.dest)
        _fsync_dir(parent)
        _hook("renamed")
        if self.replaced.exists():
            shutil.rmtree(self.replaced)


# ---- helpers -------------------------------------------------------------------------------------

def _ordered(pool: ThreadPoolExecutor, fns, window: int):
    """Run callables on the pool with at most `window` in flight; yield results in order."""
    pending: deque = deque()
    try:
        for fn in fns:
            pending.append(pool.submit(fn))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()  # wait: no worker may still touch the writer's inputs


def _os_error(e: OSError, where: Path) -> ConvertError:
    if e.errno == errno.ENOSPC:
        return ConvertError(f"{where}: disk full (ENOSPC) while writing; free some space and run the same "
                            "command again: finished files are kept")
    return ConvertError(f"{where}: {e.strerror or e}")


def _read_progress(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable ({e}); delete {path.parent} to start over") from None
    if (not isinstance(data, dict) or data.get("format") != "ernie-edge-progress"
            or not isinstance(data.get("files"), dict)):
        raise ConvertError(f"{path}: not an ernie-edge progress file; delete {path.parent} to start over")
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (POSIX; Windows has no directory fsync)."""
    if os.name != "nt":
        _fsync_file(path)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                smoothing=0.1)
