"""Find and validate a model: a converted edge folder, an HF checkpoint folder, the name of a
folder in the models store (`ernie-edge list`), or an HF repo id resolved in the local Hugging Face
cache, tried in that order. Clear errors, never a guess."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError
from .paths import models_dir

MANIFEST_NAME = "manifest.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelLocation:
    kind: str  # "edge" (converted folder) or "hf" (Hugging Face checkpoint)
    path: Path
    repo_id: str | None = None
    revision: str | None = None


def hf_cache_dir() -> Path:
    """The hub cache, as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME, or ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def find_in_hf_cache(repo_id: str, revision: str = "main") -> tuple[Path, str] | None:
    """The snapshot folder of a repo in the local cache and its commit hash, or None."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if snapshot.is_dir():
        return snapshot, commit
    return None


def looks_like_path(text: str) -> bool:
    """Whether what the user typed can only be a path (never a repo id or a store name): it starts
    with /, ~ or . (./x, ../x), or holds a separator that repo ids never have."""
    seps = {os.sep, os.altsep} - {None, "/"}  # "\\" on Windows
    return (text.startswith(("/", "~", ".")) or any(sep in text for sep in seps)
            or text.count("/") > 1 or text.endswith("/"))


def is_store_name(text: str) -> bool:
    """A bare folder name (no separator), as `ernie-edge list` shows them."""
    return bool(text) and not looks_like_path(text) and "/" not in text and text not in (".", "..")


def resolve(path_or_repo: str | os.PathLike) -> ModelLocation:
    """Turn what the user typed into a ModelLocation, or raise ModelNotFoundError saying why."""
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_folder(path)
    if is_store_name(text) and (models_dir() / text).exists():
        return _resolve_folder(models_dir() / text)
    if _REPO_ID.match(text):
        repo = text
        found = find_in_hf_cache(repo)
        if found:
            return ModelLocation("hf", found[0], repo_id=repo, revision=found[1])
        raise ModelNotFoundError(f"{text}: no such folder, and repo id {repo!r} is not in the local "
                                 f"Hugging Face cache ({hf_cache_dir()}); download it first "
                                 f"(`hf download {repo}`) or pass the folder path")
    if is_store_name(text):
        raise ModelNotFoundError(f"{text}: no such folder, and no model of that name in the models "
                                 f"store ({models_dir()}); `ernie-edge list` shows the models there")
    raise ModelNotFoundError(f"{text}: no such file or folder")


def _resolve_folder(path: Path) -> ModelLocation:
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: is a file; give the model folder (with config.json)")
    unfinished = path.name.endswith(".partial") or any(path.glob("experts-*.safetensors*"))
    if (path / MANIFEST_NAME).is_file() and not path.name.endswith(".partial"):
        return ModelLocation("edge", path)
    if unfinished:  # checked before config.json: a staging folder has one too
        raise ModelNotFoundError(f"{path}: an unfinished conversion (no {MANIFEST_NAME}); run "
                                 "`ernie-edge convert` again to resume it")
    if (path / "config.json").is_file():
        return ModelLocation("hf", path)
    raise ModelNotFoundError(f"{path}: neither a converted model ({MANIFEST_NAME}) nor an HF "
                             "checkpoint (config.json)")
