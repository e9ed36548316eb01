"""Where ernie-edge keeps things on disk: converted models and caches.

In a source checkout converted models live in the repository's `models/` folder (git-ignored);
in an installed copy, in the platform's user data dir. ERNIE_EDGE_HOME overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "ernie-edge"


def _source_checkout() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "models").is_dir():
        return root
    return None


def models_dir() -> Path:
    """The models store: converted model folders (and the demo checkpoint) go here by default."""
    if os.environ.get("ERNIE_EDGE_HOME"):
        return Path(os.environ["ERNIE_EDGE_HOME"]) / "models"
    root = _source_checkout()
    if root is not None:
        return root / "models"
    return Path(platformdirs.user_data_dir(APP)) / "models"


def cache_dir() -> Path:
    """User cache (numba JIT cache, tokenizer.json built from tokenizer.model, ...)."""
    if os.environ.get("ERNIE_EDGE_HOME"):
        return Path(os.environ["ERNIE_EDGE_HOME"]) / "cache"
    return Path(platformdirs.user_cache_dir(APP))
