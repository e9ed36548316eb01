"""Screenshots of the desktop app for docs/screenshots/: the real app under Xvfb, light and dark,
1280x800 and 800x600, the Thinking section folded and open.

    python benchmarks/gui_screenshots.py [--out docs/screenshots]

Runs itself under `xvfb-run` when there is no display (scripts/setup.sh --gui installs Xvfb);
without Xvfb it falls back to Qt's offscreen platform. The model is the tiny synthetic one, its
words scripted through the LocalBackend test hook (random weights write random text); everything
else (window, streaming, Markdown, figures under the answer) is the app as it runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TURNS = [
    ("What is a mixture-of-experts model? Two sentences, please.",
     "The user wants a short definition. Key points: many expert feed-forward blocks, a router that "
     "picks a few per token, so compute per token stays small while total parameters are large. "
     "ERNIE-4.5-21B-A3B is a good example: 21B parameters, about 3B active.",
     "A **mixture-of-experts** (MoE) model replaces each feed-forward layer with many *experts* and a "
     "small router that sends every token to only a few of them.\n\nSo a model like ERNIE-4.5-21B-A3B "
     "holds 21 B parameters but computes with about 3 B per token, which is why it runs on a laptop."),
    ("用 Python 写一个函数，计算斐波那契数列的第 n 项。",
     "用户想要一个计算斐波那契数的函数。递归版本太慢（指数级），用迭代：两个变量滚动更新，O(n) 时间、O(1) 空间。"
     "再给一个简短的用法示例。",
     "可以用迭代的方法，时间复杂度 O(n)，空间 O(1)：\n\n```python\ndef fib(n: int) -> int:\n"
     "    \"\"\"第 n 项斐波那契数（fib(0) = 0, fib(1) = 1）。\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
     "        a, b = b, a + b\n    return a\n\nprint([fib(i) for i in range(10)])\n```\n\n"
     "输出 `[0, 1, 1, 2, 3, 5, 8, 13, 21, 34]`。"),
]
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

    from gui_helpers import scripted, tiny_edge_dir
    from ernie_edge.gui.backends import LocalBackend, LocalSettings
    from ernie_edge.gui.launch import GuiSettings, build_window

    app = QApplication(sys.argv[:1])
    tmp = Path(tempfile.mkdtemp())
    model = tiny_edge_dir(tmp)
    scripts = iter([scripted(think, answer) for _, think, answer in TURNS])

    def factory(settings):
        return LocalBackend(LocalSettings(str(model), context=4096), forced=lambda req: next(scripts))
    w = build_window(GuiSettings(model=str(model), data_dir=tmp, config_dir=tmp, theme="light"), factory)
    w.resize(*SIZES[0])
    w.show()
    while w.backend is None:
        settle(app, 0.05)
    for question, _, _ in TURNS:
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
