"""The models store: the folder where `convert` puts converted models by default (paths.models_dir),
listed by `ernie-edge list`, emptied by `ernie-edge rm NAME`, and searched by name wherever a model
is taken (`--model NAME`, see model_dir.resolve).

Also the advice given when an unconverted checkpoint is passed where a converted model is needed:
the one `ernie-edge convert` command to run, or the name of a converted copy already in the store.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ErnieEdgeError, ModelNotFoundError
from .model_dir import MANIFEST_NAME, ModelLocation, is_store_name
from .paths import models_dir

PARTIAL = ".partial"


@dataclass(frozen=True)
class StoredModel:
    """One folder of the store. kind: "edge" (converted), "hf" (an unconverted checkpoint, e.g. the
    demo's source), "partial" (an unfinished conversion) or "other"."""

    name: str
    path: Path
    kind: str
    bytes: int
    recipe: str | None  # the recipe's name (q4g128-d6-s5g32) of a converted model

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "bytes": self.bytes,
                "recipe": self.recipe}


def list_models(store: Path | None = None) -> list[StoredModel]:
    """Every folder of the store, by name."""
    store = models_dir() if store is None else store
    if not store.is_dir():
        return []
    return [_describe(p) for p in sorted(store.iterdir(), key=lambda p: p.name.lower())
            if p.is_dir() and not p.name.startswith(".")]


def _describe(path: Path) -> StoredModel:
    if path.name.endswith(PARTIAL):
        kind = "partial"
    elif (path / MANIFEST_NAME).is_file():
        kind = "edge"
    elif (path / "config.json").is_file():
        kind = "hf"
    else:
        kind = "other"
    return StoredModel(path.name, path, kind, folder_bytes(path), _recipe_name(path) if kind == "edge" else None)


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we walked
    return total


def _recipe_name(path: Path) -> str | None:
    from .formats.recipe import Recipe
    try:
        recipe = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))["recipe"]
        return Recipe.from_dict(recipe).name
    except (OSError, ValueError, KeyError, TypeError, ErnieEdgeError):
        return None  # an unreadable manifest: `ernie-edge verify NAME` says what is wrong


def format_list(models: list[StoredModel], store: Path) -> str:
    """The `ernie-edge list` table: name, size, recipe, path; the store's path first."""
    from .manifest import format_size
    lines = [f"models store: {store}"]
    if not models:
        lines.append("(empty: `ernie-edge convert SRC` puts converted models here)")
        return "\n".join(lines)
    what = {"edge": None, "hf": "(not converted)", "partial": "(unfinished)", "other": "(not a model)"}
    rows = [(m.name, format_size(m.bytes), m.recipe or what[m.kind] or "?", str(m.path)) for m in models]
    widths = [max(len(r[i]) for r in rows + [("NAME", "SIZE", "RECIPE", "PATH")]) for i in range(3)]
    for row in [("NAME", "SIZE", "RECIPE", "PATH")] + rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


def find(name: str, store: Path | None = None) -> StoredModel:
    """The store's folder called `name`, or ModelNotFoundError listing the names there."""
    store = models_dir() if store is None else store
    if not is_store_name(name):
        raise ModelNotFoundError(f"{name!r} is not a model name (a folder of the models store, "
                                 "as `ernie-edge list` shows them); give the name, not a path")
    path = store / name
    if not path.is_dir() or name.startswith("."):
        names = ", ".join(m.name for m in list_models(store)) or "none"
        raise ModelNotFoundError(f"no model named {name!r} in the models store ({store}); it holds: {names}")
    return _describe(path)


def remove(model: StoredModel) -> None:
    """Delete a folder of the store (the caller has asked the user)."""
    try:
        shutil.rmtree(model.path)
    except OSError as e:
        raise ErnieEdgeError(f"{model.path}: cannot remove it: {e.strerror or e}") from None


# ---- unconverted checkpoints ---------------------------------------------------------------------

def conversion_advice(typed: str, location: ModelLocation, reference_ok: bool = True) -> str:
    """Why an HF checkpoint is refused where a converted model is needed, and what to run: the
    converted copy already in the store when there is one, else the one convert command.
    reference_ok: the command has --backend reference (say so)."""
    from .formats.recipe import Recipe
    name = location.repo_id.split("/")[-1] if location.repo_id else location.path.name
    default = f"{name}-{Recipe.default().name}"
    copy = _converted_copy(location, default)
    what = f"{typed} is an unconverted Hugging Face checkpoint"
    slow = ("(the numpy reference runs it at well under 1 token/s; --backend reference runs it anyway)"
            if reference_ok else "(only converted models can be benchmarked)")
    if copy is not None:
        return f"{what}; a converted copy is in the models store: use --model {copy} {slow}"
    source = location.repo_id or str(location.path)
    return (f"{what}: convert it once with `ernie-edge convert {shlex.quote(source)}` (then use "
            f"--model {default}) {slow}")


def _converted_copy(location: ModelLocation, default: str) -> str | None:
    models = [m for m in list_models() if m.kind == "edge"]
    for m in models:
        if m.name == default:
            return m.name
    for m in models:
        try:
            source = json.loads((m.path / MANIFEST_NAME).read_text(encoding="utf-8")).get("source") or {}
        except (OSError, ValueError):
            continue
        if (location.repo_id and source.get("repo") == location.repo_id) or \
                source.get("path") == str(location.path.resolve()):
            return m.name
    return None
