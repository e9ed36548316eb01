"""manifest.json of an edge model folder (docs/FORMAT.md): read and validate it, verify the files
against their sha256, and describe the model for `ernie-edge info`.

The manifest is written last by the converter, so a folder without a valid one is never a model.
Everything in it is treated as hostile (tests/test_edge_checkpoint.py): types are checked, file names
must be plain basenames inside the folder, and an unknown format version is refused.

The tensor table is keyed by logical name: an HF name for dense tensors, `layers.LL.experts.PROJ`
for an expert bank. `shape` is the logical (dequantized) shape, `dtype` the stored dtype of the
codes (q4 U8, q8 I8) or values (f16 F16, f32 F32); q4/q8 tensors are stored as `NAME.qweight` +
`NAME.scales` (F16), f16/f32 ones as `NAME`. Since format version 2 a q4 / q5 / q6 tensor may say
`"layout": "tiles4"`: its codes are stored in 4-row tiles (formats/layout.py); without the key, by
rows. Version 1 folders (all by rows) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import ErnieConfig
from .errors import CheckpointError, ErnieEdgeError
from .formats.layout import LAYOUTS, ROWS, TILED_BITS, TILES4, has_tiles
from .formats.table import FORMATS, GROUP_SIZES, get_format
from .mmap_store import loads_strict

FORMAT_NAME = "ernie-edge"
FORMAT_VERSION = 2  # 2: tensor layouts (formats/layout.py); 1: every tensor by rows
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
DENSE_FILE = "dense.safetensors"
PROJECTIONS = ("gate", "up", "down")
MAX_MANIFEST_BYTES = 64 << 20
HASH_BLOCK = 8 << 20
_KEYS = ("format", "format_version", "source", "config", "recipe", "tensors", "files", "skipped", "created_by")


# ---- names shared by the converter and the loader -------------------------------------------------

def experts_file(layer: int) -> str:
    return f"experts-{layer:02d}.safetensors"


def bank_name(layer: int, proj: str) -> str:
    """Logical name of one projection of a layer's routed experts, e.g. `layers.01.experts.gate`."""
    return f"layers.{layer:02d}.experts.{proj}"


def stored_names(name: str, quant: str) -> tuple[str, str | None]:
    """(data tensor, scales tensor or None) names inside the safetensors file."""
    return get_format(quant).stored_names(name)


def stored_shapes(shape: tuple[int, ...], quant: str, group_size: int | None):
    """(data shape, scales shape or None) of a logical [..., K] tensor."""
    return get_format(quant).stored_shapes(shape, group_size)


# ---- the manifest ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    quant: str
    group_size: int | None
    layout: str = ROWS

    @property
    def format(self):
        """The row of ernie_edge/formats/table.py this tensor is stored in."""
        return FORMATS[self.quant]

    @property
    def nbytes(self) -> int:
        return self.format.nbytes(self.shape, self.group_size)

    @property
    def parameters(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    folder: Path
    format_version: int
    source: dict
    config: dict
    recipe: dict
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    skipped: dict[str, str]
    created_by: str

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def erniecfg(self) -> ErnieConfig:
        return ErnieConfig.from_dict(self.config, source=f"{self.path}: \"config\"")


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate `folder/manifest.json`. Raises CheckpointError naming the field."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    raw = _load_json(path)

    def bad(where: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {where}: {why}")

    missing = [k for k in _KEYS if k not in raw]
    if raw.get("format") != FORMAT_NAME:
        raise bad("format", f"is {_short(raw.get('format'))}, expected {FORMAT_NAME!r}: "
                            "not an ernie-edge model folder")
    version = raw.get("format_version")
    if type(version) is not int:
        raise bad("format_version", f"must be an integer, got {_short(version)}")
    if version not in READABLE_VERSIONS:
        newer = "a newer" if version > FORMAT_VERSION else "an older, unsupported"
        raise bad("format_version", f"{version} was written by {newer} ernie-edge; this build reads "
                                    f"versions {READABLE_VERSIONS}: upgrade ernie-edge or convert the model again")
    if missing:
        raise bad("keys", f"missing {missing}")
    for key, typ in (("source", dict), ("config", dict), ("recipe", dict), ("tensors", dict),
                     ("files", dict), ("skipped", dict), ("created_by", str)):
        if not isinstance(raw[key], typ):
            raise bad(key, f"must be a JSON {typ.__name__.replace('dict', 'object').replace('str', 'string')}")
    files = {name: _file_entry(name, entry, bad) for name, entry in raw["files"].items()}
    _check_case_collisions(files, bad)
    tensors = {name: _tensor_entry(name, entry, files, bad, version) for name, entry in raw["tensors"].items()}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw["skipped"].items()):
        raise bad("skipped", "must map tensor names to reason strings")
    try:
        _check_recipe(raw["recipe"])
        ErnieConfig.from_dict(raw["config"], source=f"{path}: \"config\"")
    except ErnieEdgeError as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    return Manifest(folder, version, raw["source"], raw["config"], raw["recipe"], tensors, files,
                    dict(raw["skipped"]), raw["created_by"])


def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise CheckpointError(f"{path}: {size} bytes is too large for a manifest "
                                      f"(limit {MAX_MANIFEST_BYTES}); the folder is corrupt")
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found: the folder is not a finished ernie-edge conversion "
                              "(run `ernie-edge convert` again)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a manifest") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None

    def duplicate(k):
        return CheckpointError(f"{path}: duplicate key {_short(k)} (corrupt or tampered manifest)")

    try:
        raw = loads_strict(data.decode("utf-8"), duplicate)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not valid UTF-8 at byte {e.start}: the manifest is corrupt") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({getattr(e, 'msg', 'too deeply nested')}): "
                              "the manifest is corrupt; convert the model again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def check_file_name(name) -> str | None:
    """Why `name` is not a plain file name inside the folder, or None (C6: no traversal)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if len(name) > 255 or any(ord(c) < 32 for c in name):
        return "too long or has control characters"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or os.path.isabs(name):
        return "not a plain file name inside the model folder"
    if name == MANIFEST_NAME or name.endswith(".partial"):
        return "a reserved name"
    return None


def _file_entry(name, entry, bad) -> FileEntry:
    where = f"files[{_short(name)}]"
    why = check_file_name(name)
    if why:
        raise bad(where, why)
    if not isinstance(entry, dict):
        raise bad(where, "must be an object {bytes, sha256}")
    size, digest = entry.get("bytes"), entry.get("sha256")
    if type(size) is not int or size < 0:
        raise bad(where + ".bytes", f"must be a non-negative integer, got {_short(size)}")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise bad(where + ".sha256", f"must be 64 lowercase hex digits, got {_short(digest)}")
    return FileEntry(name, size, digest)


def _check_case_collisions(files: dict[str, FileEntry], bad) -> None:
    seen: dict[str, str] = {}
    for name in files:
        low = name.casefold()
        if low in seen:
            raise bad("files", f"{seen[low]!r} and {name!r} differ only in case")
        seen[low] = name


def _tensor_entry(name, entry, files, bad, version: int = FORMAT_VERSION) -> TensorEntry:
    where = f"tensors[{_short(name)}]"
    if not name or len(name) > 1024 or any(ord(c) < 32 for c in name):
        raise bad(where, "invalid tensor name")
    if not isinstance(entry, dict):
        raise bad(where, "must be an object")
    file, dtype, shape = entry.get("file"), entry.get("dtype"), entry.get("shape")
    quant, group = entry.get("quant"), entry.get("group_size")
    if not isinstance(file, str) or file not in files or not file.endswith(".safetensors"):
        raise bad(where + ".file", f"{_short(file)} is not a .safetensors file listed in \"files\"")
    if not isinstance(quant, str) or quant not in FORMATS:
        raise bad(where + ".quant", f"{_short(quant)} is not one of {list(FORMATS)}")
    fmt = FORMATS[quant]
    if dtype != fmt.dtype:
        raise bad(where + ".dtype", f"{_short(dtype)} does not match quant {quant!r} "
                                    f"(expected {fmt.dtype!r})")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
            or not all(type(d) is int and 0 <= d <= 1 << 32 for d in shape)):
        raise bad(where + ".shape", f"must be a list of 1 to 8 non-negative integers, got {_short(shape)}")
    if fmt.grouped:
        if group not in GROUP_SIZES or type(group) is not int:
            raise bad(where + ".group_size", f"{_short(group)} is not one of {list(GROUP_SIZES)}")
        if shape[-1] % group:
            raise bad(where + ".shape", f"input dimension {shape[-1]} is not a multiple of group_size {group}")
    elif group is not None:
        raise bad(where + ".group_size", f"must be null for {quant}, got {_short(group)}")
    layout = entry.get("layout", ROWS)
    if layout != ROWS:
        if version < 2:
            raise bad(where + ".layout", f"format version {version} has no layouts, got {_short(layout)}")
        if layout not in LAYOUTS:
            raise bad(where + ".layout", f"{_short(layout)} is not one of {list(LAYOUTS)}")
        if fmt.bits not in TILED_BITS or len(shape) < 2 or not has_tiles(shape[-2], shape[-1]):
            raise bad(where + ".layout", f"{quant} {shape} cannot be stored in {TILES4} (int4 / int5 / int6 "
                                         "with rows % 4 == 0 and inputs % 128 == 0)")
    return TensorEntry(name, file, dtype, tuple(shape), quant, group, layout)


def _check_recipe(recipe: dict) -> None:
    from .formats.recipe import Recipe
    Recipe.from_dict(recipe)


def _short(value) -> str:
    """A value for an error message: repr, control characters escaped, at most 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- verify -------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, on_bytes=None, block: int = HASH_BLOCK) -> str:
    """Hex sha256 of a file, read in `block`-byte pieces (hashlib releases the GIL on each)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def verify(folder: str | os.PathLike, progress: bool = False, threads: int = 0) -> list[str]:
    """Check every file of an edge folder against the manifest's size and sha256.

    Returns the problems found (empty: all good), each naming the file, with 12-hex-digit prefixes
    of the expected and actual digests. An invalid manifest raises CheckpointError."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[str] = []
    to_hash: list[FileEntry] = []
    for entry in manifest.files.values():
        problem = _check_size(folder, entry)
        if problem:
            problems.append(problem)
        else:
            to_hash.append(entry)
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".safetensors") and path.name not in manifest.files:
            problems.append(f"{path.name}: not listed in the manifest (a stray or renamed file)")

    bar = _bar(sum(e.bytes for e in to_hash), progress)
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = pool.map(lambda e: sha256_file(folder / e.name, bar.update if bar else None), to_hash)
        for entry, digest in zip(to_hash, digests):
            if digest != entry.sha256:
                problems.append(f"{entry.name}: sha256 mismatch: expected {entry.sha256[:12]}, "
                                f"got {digest[:12]} (corrupt or modified; convert the model again)")
    if bar is not None:
        bar.close()
    return problems


def _check_size(folder: Path, entry: FileEntry) -> str | None:
    path = folder / entry.name
    if path.is_symlink() and not _inside(folder, path):
        return f"{entry.name}: a symlink pointing outside the model folder"
    if not path.is_file():
        return f"{entry.name}: missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"{entry.name}: {size} bytes, the manifest says {entry.bytes} (truncated or replaced)"
    return None


def _inside(folder: Path, path: Path) -> bool:
    root = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify")


# ---- describe -----------------------------------------------------------------------------------

def describe(folder: str | os.PathLike) -> dict:
    """Facts for `ernie-edge info`: recipe, per-role parameters / bytes / bits per weight, total
    bytes, and a memory estimate (resident dense bytes, expert bytes read per token, KV cache)."""
    from .formats.hf_ernie import expected_tensors

    folder = Path(folder)
    m = read_manifest(folder)
    cfg = m.erniecfg()
    roles_by_name = {name: spec.role for name, spec in expected_tensors(cfg).items()}
    roles: dict[str, dict] = {}
    for t in m.tensors.values():
        role = "expert" if t.name.startswith("layers.") else roles_by_name.get(t.name, "other")
        r = roles.setdefault(role, {"tensors": 0, "parameters": 0, "bytes": 0, "quant": []})
        r["tensors"] += 1
        r["parameters"] += t.parameters
        r["bytes"] += t.nbytes
        if t.quant not in r["quant"]:
            r["quant"].append(t.quant)
    for r in roles.values():
        r["bits_per_weight"] = round(8 * r["bytes"] / r["parameters"], 4) if r["parameters"] else 0.0
    fallbacks = _fallbacks(m, roles_by_name)
    params = sum(r["parameters"] for r in roles.values())
    weight_bytes = sum(r["bytes"] for r in roles.values())
    expert_bytes = roles.get("expert", {}).get("bytes", 0)
    moe_layers = len(cfg.moe_layers)
    per_expert = expert_bytes // max(1, moe_layers * cfg.moe_num_experts)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_head * 2  # K and V, fp16
    return {
        "path": str(folder),
        "format_version": m.format_version,
        "created_by": m.created_by,
        "source": m.source,
        "recipe": m.recipe,
        "layers": cfg.num_hidden_layers,
        "experts": cfg.moe_num_experts,
        "experts_per_token": cfg.moe_k,
        "parameters": params,
        "total_bytes": sum(f.bytes for f in m.files.values()),
        "bits_per_weight": round(8 * weight_bytes / params, 4) if params else 0.0,
        "roles": roles,
        "skipped": len(m.skipped),
        "fallbacks": fallbacks,
        "memory": {
            "resident_dense_bytes": weight_bytes - expert_bytes,
            "expert_bytes_total": expert_bytes,
            "expert_bytes_per_token": per_expert * cfg.moe_k * moe_layers,
            "kv_bytes_per_1k_tokens": kv_per_token * 1000,
            "kv_dtype": "f16",
        },
        "template": _template_info(folder),
    }


def _fallbacks(m: Manifest, roles_by_name: dict[str, str]) -> dict[str, str]:
    """Tensors stored otherwise than the recipe asks (an input width its group size does not
    divide: formats.table.choose_storage), e.g. {"layers.01.experts.down": "q4 g64 -> f16 (input
    width 48)"}."""
    from .formats.recipe import Recipe

    recipe = Recipe.from_dict(m.recipe)
    out = {}
    for t in m.tensors.values():
        role = "expert" if t.name.startswith("layers.") else roles_by_name.get(t.name)
        if role is None:
            continue
        want, want_group = recipe.storage_for(role)
        if (t.quant, t.group_size) != (want, want_group):
            asked = want + (f" g{want_group}" if want_group else "")
            got = t.quant + (f" g{t.group_size}" if t.group_size else "")
            out[t.name] = f"{asked} -> {got} (input width {t.shape[-1]})"
    return out


def _recipe_line(r: dict) -> str:
    """The recipe as `info` prints it: its name, then what the name means."""
    from .formats.recipe import Recipe

    recipe = Recipe.from_dict(r)
    parts = [f"experts int{recipe.expert_bits}", f"dense {recipe.dense_bits}-bit", f"group {recipe.group_size}"]
    parts += [f"{role} {bits}-bit g{group}" for role, bits, group in recipe.roles]
    return f"{recipe.name} ({', '.join(parts)})"


def _template_info(folder: Path) -> dict | None:
    try:
        from .chat_template import ChatTemplate
    except ImportError:
        return None
    try:
        t = ChatTemplate.from_model_dir(folder)
    except ErnieEdgeError as e:
        return {"error": str(e)}
    return {"origin": "built-in" if t.is_builtin else Path(t.origin).name, "sha256": t.sha256,
            "matches_builtin": t.matches_builtin}


def format_size(n: float) -> str:
    """Bytes as text with a unit: 1.80 GB, 640 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_description(info: dict) -> str:
    """`describe()` as the human-readable text `ernie-edge info` prints."""
    mem, r, src = info["memory"], info["recipe"], info["source"]
    lines = [
        f"{info['path']}",
        f"  format v{info['format_version']}, {info['created_by']}; source {src.get('repo') or src.get('path')}"
        + (f" @ {src['revision']}" if src.get("revision") else ""),
        f"  recipe: {_recipe_line(r)}",
        f"  {info['layers']} layers, {info['experts']} experts ({info['experts_per_token']} per token), "
        f"{_count(info['parameters'])} parameters, {info['bits_per_weight']:.2f} bits/weight",
        f"  files: {format_size(info['total_bytes'])}",
        "",
        f"  {'role':<14}{'quant':<8}{'params':>12}{'size':>12}{'bits/w':>8}",
    ]
    for role, d in sorted(info["roles"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {role:<14}{','.join(d['quant']):<8}{_count(d['parameters']):>12}"
                     f"{format_size(d['bytes']):>12}{d['bits_per_weight']:>8.2f}")
    lines += [
        "",
        f"  memory: {format_size(mem['resident_dense_bytes'])} dense (always resident); experts mapped "
        f"from disk: {format_size(mem['expert_bytes_per_token'])} read per token, "
        f"{format_size(mem['expert_bytes_total'])} in all",
        f"  KV cache ({mem['kv_dtype']}): {format_size(mem['kv_bytes_per_1k_tokens'])} per 1k tokens",
    ]
    for name, what in info.get("fallbacks", {}).items():
        lines.append(f"  fallback: {name}: {what}")
    t = info.get("template")
    if t and "error" in t:
        lines.append(f"  chat template: ERROR {t['error']}")
    elif t:
        flag = ("matches the built-in ERNIE template" if t["matches_builtin"]
                else "DIFFERS from the built-in ERNIE template")
        lines.append(f"  chat template: {t['origin']}, sha256 {t['sha256'][:12]} ({flag})")
    return "\n".join(lines)
