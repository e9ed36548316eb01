"""Where ernie-edge keeps things on disk (converted models, caches, chat history), and with which
permissions new files are made.

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


def chat_history_file() -> Path:
    """The terminal chat's line-editing history (readline), kept between sessions."""
    return cache_dir() / "chat_history"


def current_umask() -> int:
    """This process's umask (022 on most systems), read without changing it where /proc has it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back)
    os.umask(mask)
    return mask


def share_file(path: str | os.PathLike) -> None:
    """Give a file the mode an ordinary new file gets (0644 under umask 022): for files made by
    tempfile.mkstemp, which are 0600 whatever the umask, so other users could not read them."""
    os.chmod(path, 0o666 & ~current_umask())
