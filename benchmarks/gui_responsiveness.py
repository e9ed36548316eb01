"""How long the desktop app's event loop stalls while a model decodes (the goal: typing stays
responsive, every stall < 50 ms).

    python benchmarks/gui_responsiveness.py [--model DIR] [--tokens 300] [--json OUT]

Opens the real window (offscreen) with the model (default: the tiny synthetic one, scripted to
write a long Markdown answer so the renderer works too; with --model, the model writes freely),
starts an answer, and meanwhile (1) a 5 ms heartbeat timer records how late each tick fires and
(2) a key press is typed into the message box every 30 ms, timed from posting to handling. The
same heartbeat is measured idle first. Figures in ms: p50 / p99 / max heartbeat lateness and key
latency while decoding, and decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from PyQt6.QtCore import QCoreApplication, QEvent, QEventLoop, Qt, QTimer  # noqa: E402
from PyQt6.QtGui import QKeyEvent  # noqa: E402
from PyQt6.QtWidgets import QApplication  # noqa: E402

from _machine import machine  # noqa: E402
from ernie_edge.gui.backends import LocalBackend, LocalSettings  # noqa: E402
from ernie_edge.gui.launch import GuiSettings, build_window  # noqa: E402

BEAT_MS, KEY_MS = 5, 30
ANSWER_LINE = "- a line of the answer with **bold**, `code` and 中文 text\n"


def long_script(tokens: int) -> str:
    """About `tokens` tokens of the tiny model's tokenizer (~3 characters each): a fifth thinking,
    the rest a Markdown answer with a list and a code block."""
    chars = 3 * tokens
    lines = max(1, 4 * chars // 5 // (len(ANSWER_LINE) + 14))
    code = "```python\n" + "".join(f"x{i} = {i} * 2\n" for i in range(lines)) + "```\n"
    return "think " * (chars // 30) + "\n</think>\n\n<response>\n" + ANSWER_LINE * lines + code + "\n</response>"


def pct(values, q):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 2) if v else 0.0


class Probe:
    """A heartbeat timer's lateness and the latency of synthetic key presses, in ms."""

    def __init__(self, target):
        self.target, self.late, self.keys = target, [], []
        self._last = None
        self.beat = QTimer(interval=BEAT_MS, timeout=self._tick)
        self.beat.setTimerType(Qt.TimerType.PreciseTimer)
        self.typer = QTimer(interval=KEY_MS, timeout=self._type)
        self.posted: float | None = None  # when the last synthetic key press was posted

    def _tick(self):
        now = time.perf_counter()
        if self._last is not None:
            self.late.append(max(0.0, (now - self._last) * 1000 - BEAT_MS))
        self._last = now

    def _type(self):
        self.posted = time.perf_counter()
        QCoreApplication.postEvent(self.target, QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_A,
                                                          Qt.KeyboardModifier.NoModifier, "a"))

    def start(self, typing: bool):
        self._last = None
        self.late = []
        self.beat.start()
        if typing:
            self.typer.start()

    def stop(self):
        self.beat.stop()
        self.typer.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a converted model (default: the tiny one, scripted)")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gui_responsiveness.json")
    a = p.parse_args()
    measured_on = machine()
    app = QApplication(sys.argv[:1])
    tmp = Path(tempfile.mkdtemp())
    if a.model is None:
        from gui_helpers import tiny_edge_dir
        model, forced = tiny_edge_dir(tmp), (lambda req: long_script(a.tokens))
    else:
        model, forced = a.model, None

    def factory(settings):
        return LocalBackend(LocalSettings(str(model), context=max(4096, a.tokens + 512)), forced=forced)
    w = build_window(GuiSettings(model=str(model), data_dir=tmp, config_dir=tmp, theme="light"), factory)
    w.settings.max_tokens = a.tokens if forced is None else 4 * a.tokens  # a script ends by itself
    w.show()
    while w.backend is None:
        app.processEvents(QEventLoop.ProcessEventsFlag.WaitForMoreEvents, 50)

    key_latency = []
    orig = w.input.keyPressEvent

    def timed_key(event):
        if event.text() == "a" and probe.posted is not None:
            key_latency.append((time.perf_counter() - probe.posted) * 1000)
        orig(event)
    w.input.keyPressEvent = timed_key
    probe = Probe(w.input)
    renders = []  # ms per Markdown re-render of the growing answer (the UI thread's biggest job)
    render = w.controller._render

    def timed_render():
        t = time.perf_counter()
        render()
        renders.append((time.perf_counter() - t) * 1000)
    w.controller._render = timed_render
    w.controller._render_timer.timeout.disconnect()
    w.controller._render_timer.timeout.connect(timed_render)

    loop = QEventLoop()
    probe.start(typing=False)
    QTimer.singleShot(2000, loop.quit)
    loop.exec()
    probe.stop()
    idle = list(probe.late)

    w.input.setPlainText("Write a long answer.")
    w.send()
    probe.start(typing=True)
    t0 = time.perf_counter()
    w.controller.busy_changed.connect(lambda busy: busy or loop.quit())
    loop.exec()
    elapsed = time.perf_counter() - t0
    probe.stop()
    busy = list(probe.late)
    stats = w.chat.widgets[-1].message.stats or {}
    result = {
        "model": str(model), "machine": measured_on, "scripted": forced is not None, "tokens": stats.get("completion_tokens"),
        "decode_tok_s": round(stats.get("decode_tok_s", 0.0), 2), "seconds": round(elapsed, 2),
        "idle_heartbeat_late_ms": {"p50": pct(idle, 0.5), "p99": pct(idle, 0.99), "max": pct(idle, 1.0)},
        "decoding_heartbeat_late_ms": {"p50": pct(busy, 0.5), "p99": pct(busy, 0.99), "max": pct(busy, 1.0)},
        "decoding_key_latency_ms": {"p50": pct(key_latency, 0.5), "p99": pct(key_latency, 0.99),
                                    "max": pct(key_latency, 1.0), "keys": len(key_latency)},
        "render_ms": {"count": len(renders), "p50": pct(renders, 0.5), "max": pct(renders, 1.0)},
        "stalls_over_50ms": sum(x > 50 for x in busy),
        "mean_busy_late_ms": round(statistics.fmean(busy), 2) if busy else 0.0,
    }
    print(json.dumps(result, indent=2))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
