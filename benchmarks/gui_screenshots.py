"""Screenshots of the desktop app for docs/screenshots/: the real app under Xvfb, light and dark,
1280x800 and 800x600, the Thinking section folded and open.

    python benchmarks/gui_screenshots.py [--out docs/screenshots]

Runs itself under `xvfb-run` when there is no display (scripts/setup.sh --gui installs Xvfb);
without Xvfb it falls back to Qt's offscreen platform. The model is the built-in demo model
(models/demo), answering for real at temperature 0: nothing on screen is scripted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is 47 + 38?", "肯尼亚的首都是哪里？"]
SIZES = [(1280, 800), (800, 600)]


def reexec_under_xvfb() -> None:
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("QT_QPA_PLATFORM"):
        if shutil.which("xvfb-run") and not os.environ.get("ERNIE_EDGE_UNDER_XVFB"):
            os.environ["ERNIE_EDGE_UNDER_XVFB"] = "1"
            os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable,
                                   *sys.argv])
        print("no display and no xvfb-run: using Qt's offscreen platform", file=sys.stderr)
        os.environ["QT_QPA_PLATFORM"] = "offscreen"


def settle(app, seconds: float = 0.4) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    a = p.parse_args()
    reexec_under_xvfb()
    from PyQt6.QtWidgets import QApplication

    from ernie_edge.demo import ensure_demo_model
    from ernie_edge.gui.launch import GuiSettings, build_window
    from ernie_edge.gui.window import make_backend

    app = QApplication(sys.argv[:1])
    tmp = Path(tempfile.mkdtemp())
    os.environ["ERNIE_EDGE_HOME"] = str(tmp)  # the demo model is converted into a fresh store
    (tmp / "gui.json").write_text(json.dumps({"temperature": 0.0}))
    w = build_window(GuiSettings(model=str(ensure_demo_model()), data_dir=tmp, config_dir=tmp, theme="light"),
                     make_backend)
    w.resize(*SIZES[0])
    w.show()
    while w.backend is None:
        settle(app, 0.05)
    for question in QUESTIONS:
        w.input.setPlainText(question)
        w.send()
        while w.controller.busy:
            settle(app, 0.05)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"platform: {app.platformName()}")
    for theme in ("light", "dark"):
        if theme != "light":
            w.set_theme(theme)
            settle(app, 0.5)
        for width, height in SIZES:
            w.resize(width, height)
            for state in ("folded", "open"):
                last = w.chat.widgets[-1]
                last.thinking.set_expanded(state == "open")
                settle(app)
                w.chat.scroll_to_bottom()
                settle(app, 0.2)
                path = a.out / f"gui-{theme}-{width}x{height}-thinking-{state}.png"
                shot = w.screen().grabWindow(w.winId()) if app.platformName() == "xcb" else w.grab()
                shot.save(str(path))
                print(path)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
