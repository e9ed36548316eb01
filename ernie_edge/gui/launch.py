"""Starting the app (`run_gui`) and putting it in the desktop menu (`install_desktop`).

Qt is imported inside run_gui only, so `ernie-edge install-desktop` and the CLI work without it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APP_ID = "ernie-edge"
ASSETS = Path(__file__).resolve().parent / "assets"
ICON_PNG = ASSETS / "ernie-edge.png"
ICON_SVG = ASSETS / "ernie-edge.svg"
T_START = time.perf_counter()  # first import of this module: the start of the launch, near enough


@dataclass(frozen=True)
class GuiSettings:
    """How the app was started. model: a folder or a name in the models store (overrides the saved
    choice). data_dir / config_dir: where the chat history / settings live (defaults: the
    platform's user folders). theme: "light", "dark" or "system" (overrides the saved one).
    demo_on_first_start: with no saved settings and no model given, open the built-in demo model
    (the app does; tests and benchmarks don't)."""

    model: str | None = None
    data_dir: Path | None = None
    config_dir: Path | None = None
    theme: str | None = None
    demo_on_first_start: bool = False


def run_gui(settings: GuiSettings, backend_factory=None) -> int:
    """Open the window and run until it closes; returns the exit code. The window shows at once;
    the model loads in the background. backend_factory (tests, benchmarks) replaces how the
    settings become a Backend."""
    from PyQt6.QtGui import QIcon
    from PyQt6.QtWidgets import QApplication

    from .window import make_backend

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName(APP_ID)
    app.setDesktopFileName(APP_ID)
    app.setWindowIcon(QIcon(str(ICON_SVG if ICON_SVG.is_file() else ICON_PNG)))
    window = build_window(settings, backend_factory or make_backend)
    if os.environ.get("ERNIE_EDGE_GUI_TIMING"):
        _report_first_paint(window, quit_after=os.environ["ERNIE_EDGE_GUI_TIMING"] == "exit")
    window.show()
    return app.exec()


def _report_first_paint(window, quit_after: bool) -> None:
    """benchmarks/gui_startup.py: print "painted" on stdout when the window first paints (and quit)."""
    from PyQt6.QtCore import QEvent, QObject, QTimer
    from PyQt6.QtWidgets import QApplication

    class Probe(QObject):
        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Paint and not getattr(self, "done", False):
                self.done = True
                print(f"painted {time.perf_counter() - T_START:.3f}", flush=True)
                if quit_after:
                    QTimer.singleShot(0, QApplication.instance().quit)
            return False
    window.probe = Probe(window)
    window.installEventFilter(window.probe)


def build_window(settings: GuiSettings, backend_factory):
    """The main window for these launch settings (a QApplication must exist)."""
    from PyQt6.QtWidgets import QApplication

    from . import settings as app_settings
    from .models import resolve_model_arg
    from .theme import apply_theme, resolve_theme
    from .window import MainWindow

    config_dir = settings.config_dir or app_settings.config_dir()
    data_dir = settings.data_dir or app_settings.data_dir()
    first_start = not (config_dir / app_settings.SETTINGS_FILE).exists()
    saved, notice = app_settings.load_settings(config_dir)
    start_demo = settings.demo_on_first_start and first_start and not settings.model
    if settings.model:
        saved.mode, saved.model_path = "local", resolve_model_arg(settings.model)
    if settings.theme:
        saved.theme = settings.theme
    apply_theme(QApplication.instance(), resolve_theme(saved.theme))
    return MainWindow(saved, data_dir, config_dir, backend_factory, notices=[notice] if notice else [],
                      start_demo=start_demo)


# ---- desktop entry ------------------------------------------------------------------------------

def _exec_line() -> str:
    """The command the menu entry runs: the installed gui-script next to this Python if there is
    one, else this Python with -m."""
    script = Path(sys.executable).with_name("ernie-edge-gui")
    found = str(script) if script.is_file() else shutil.which("ernie-edge-gui")
    if found:
        return _quote(found)
    return f"{_quote(sys.executable)} -m ernie_edge.gui.app"


def _quote(arg: str) -> str:
    """Quote for a desktop entry's Exec key (freedesktop: double quotes, escape \\ \" ` $)."""
    if all(c.isalnum() or c in "/._-+" for c in arg):
        return arg
    return '"' + "".join("\\" + c if c in '\\"`$' else c for c in arg) + '"'


def desktop_entry(exec_line: str, icon: str) -> str:
    return "\n".join([
        "[Desktop Entry]", "Type=Application", "Version=1.0", "Name=ERNIE Edge",
        "GenericName=Offline AI chat", "Comment=Chat with ERNIE on this computer, offline",
        f"Exec={exec_line} %U", f"Icon={icon}", "Terminal=false", "Categories=Utility;Office;",
        "Keywords=AI;chat;LLM;ERNIE;offline;", f"StartupWMClass={APP_ID}", ""])


def install_desktop(data_home: Path | None = None, desktop: Path | None = None) -> list[Path]:
    """Write the freedesktop menu entry and icon for the current user (Linux and other XDG
    desktops); also a launcher on the desktop folder when there is one. Returns the files written."""
    if sys.platform in ("win32", "darwin") and data_home is None:
        from ..errors import ErnieEdgeError
        raise ErnieEdgeError("install-desktop writes a freedesktop (Linux) menu entry; on Windows and macOS "
                             "make a shortcut to ernie-edge-gui as docs/GUI.md describes")
    data_home = data_home or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    icons = data_home / "icons" / "hicolor"
    written = []
    for src, dst in ((ICON_PNG, icons / "256x256" / "apps" / f"{APP_ID}.png"),
                     (ICON_SVG, icons / "scalable" / "apps" / f"{APP_ID}.svg")):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)
    entry = desktop_entry(_exec_line(), str(written[0]))
    apps = data_home / "applications" / f"{APP_ID}.desktop"
    apps.parent.mkdir(parents=True, exist_ok=True)
    apps.write_text(entry, encoding="utf-8")
    written.append(apps)
    desktop = desktop or Path.home() / "Desktop"
    if desktop.is_dir():
        shortcut = desktop / f"{APP_ID}.desktop"
        shortcut.write_text(entry, encoding="utf-8")
        shortcut.chmod(0o755)  # file managers launch only executable desktop files
        written.append(shortcut)
    return written
