"""The desktop app's settings: what the user chose (model, sampling, threads, theme), kept as JSON
in the platform's config dir, and where the app keeps its data. No Qt here.

ERNIE_EDGE_HOME overrides the folders (as for the models store): config and chat history then
live in $ERNIE_EDGE_HOME/gui/.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from ..errors import ErnieEdgeError
from ..paths import APP

SETTINGS_FILE = "gui.json"
THEMES = ("system", "light", "dark")
MODES = ("local", "remote")


def data_dir() -> Path:
    """Where the chat history lives (platformdirs user data dir, or $ERNIE_EDGE_HOME/gui)."""
    if os.environ.get("ERNIE_EDGE_HOME"):
        return Path(os.environ["ERNIE_EDGE_HOME"]) / "gui"
    return Path(platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    if os.environ.get("ERNIE_EDGE_HOME"):
        return Path(os.environ["ERNIE_EDGE_HOME"]) / "gui"
    return Path(platformdirs.user_config_dir(APP))


@dataclass
class AppSettings:
    """Everything the settings and model dialogs change. Saved on every change.

    mode "local": run `model_path` in this process; "remote": talk to the OpenAI-compatible server
    at `remote_url` (with `remote_key`, stored in a file only the user can read). max_tokens 0 and
    context 0 mean the model's defaults; threads 0 means all cores."""

    mode: str = "local"
    model_path: str = ""
    remote_url: str = "http://127.0.0.1:8080/v1"
    remote_key: str = ""
    remote_model: str = ""
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    context: int = 8192
    threads: int = 0
    theme: str = "system"
    server_port: int = 8080

    def check(self) -> None:
        """Raise ErnieEdgeError naming the first field out of range."""
        if self.mode not in MODES:
            raise ErnieEdgeError(f"settings mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.theme not in THEMES:
            raise ErnieEdgeError(f"settings theme {self.theme!r} is not one of {', '.join(THEMES)}")
        for name in ("max_tokens", "context", "threads"):
            if getattr(self, name) < 0:
                raise ErnieEdgeError(f"settings {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ErnieEdgeError(f"settings top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ErnieEdgeError(f"settings temperature must be >= 0, got {self.temperature}")


def load_settings(folder: Path | None = None) -> tuple[AppSettings, str | None]:
    """The saved settings, and a notice if the file was unreadable (then the defaults are used and
    the bad file is left where it is until the next save replaces it)."""
    path = (folder or config_dir()) / SETTINGS_FILE
    if not path.is_file():
        return AppSettings(), None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name: f.type for f in dataclasses.fields(AppSettings)}
        settings = AppSettings(**{k: v for k, v in raw.items() if k in known})
        settings.check()
        return settings, None
    except (OSError, ValueError, TypeError, ErnieEdgeError) as e:
        return AppSettings(), f"{path}: could not read the settings ({e}); using the defaults"


def save_settings(settings: AppSettings, folder: Path | None = None) -> Path:
    """Write the settings atomically (temp file + rename), readable by the user only: it may hold
    an API key."""
    folder = folder or config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SETTINGS_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(settings), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
