"""Shared by the desktop-app tests (tests/test_gui_*.py) and benchmarks/gui_*.py: the tiny
converted model, backends whose output is scripted, and opening the window and sending a message.

Random test weights write random text, so the app tests script what the model says: the
LocalBackend test hook (`forced`) gives the turn's engine request a logits processor that replaces
each step's logits by a one-hot row on the next token of a given text. The engine, model, sampler,
detokenizer and reasoning/answer parser all run as usual.
"""

from __future__ import annotations

from pathlib import Path

from ernie_edge.gui.backends import LocalBackend, LocalSettings

_EDGE: dict[str, Path] = {}
_MODELS: dict[str, object] = {}

THINK = "The user says hello in two languages. I will answer in both and show a small code sample."
ANSWER = "Hello! 你好！\n\n```python\nprint('hi')\n```"
SCRIPT = f"{THINK}\n</think>\n\n<response>\n{ANSWER}\n</response>"


def scripted(thinking: str, answer: str) -> str:
    """What ERNIE-Thinking writes for this thinking and answer (docs/ERNIE_SPEC.md §6)."""
    return f"{thinking}\n</think>\n\n<response>\n{answer}\n</response>"


def tiny_edge_dir(root: Path) -> Path:
    """The tiny synthetic checkpoint, converted (once per process)."""
    if "tiny" not in _EDGE:
        from ernie_edge.quant import synthetic
        from ernie_edge.quant.convert import ConvertSettings, convert
        hf = synthetic.write_checkpoint(root / "tiny-hf", "tiny")
        _EDGE["tiny"] = convert(ConvertSettings(source=str(hf), dest=root / "tiny-edge", progress=False))
    return _EDGE["tiny"]


def loaded_model(path: Path):
    """The model at path, loaded once per process (tests run one turn at a time)."""
    key = str(path)
    if key not in _MODELS:
        import ernie_edge
        _MODELS[key] = ernie_edge.load(path, max_context=4096)
    return _MODELS[key]


def scripted_factory(model, texts, context: int = 4096):
    """A window backend factory: a LocalBackend on `model` whose n-th turn writes texts[n] (the
    last one again after that). `texts` may be a list that the test changes between turns."""
    turns = {"n": 0}

    def forced(request):
        text = texts[min(turns["n"], len(texts) - 1)]
        turns["n"] += 1
        return text

    def factory(settings):
        return LocalBackend(LocalSettings(settings.model_path or str(model.path), context=context),
                            model=model, forced=forced)
    return factory


def open_window(qtbot, home, factory=None, model_path="", wait_ready=True):
    """The app's window on `home` (history and settings), shown; by default it waits until the
    backend `factory` makes (the real one if None) has loaded."""
    from ernie_edge.gui import window
    from ernie_edge.gui.launch import GuiSettings, build_window
    settings = GuiSettings(model=str(model_path) if model_path else None, data_dir=home, config_dir=home,
                           theme="light")
    w = build_window(settings, factory or window.make_backend)
    qtbot.addWidget(w)
    w.resize(1000, 700)
    w.show()
    if wait_ready:
        qtbot.waitUntil(lambda: w.backend is not None, timeout=30000)
    return w


def send(qtbot, w, text: str, wait: bool = True):
    """Type `text` in the message box and press Enter; by default wait until the answer ends."""
    from PyQt6.QtCore import Qt
    w.input.setFocus()
    w.input.setPlainText(text)  # QTest types ASCII only; the Enter below is a real key press
    qtbot.keyClick(w.input, Qt.Key.Key_Return)
    if wait:
        qtbot.waitUntil(lambda: not w.controller.busy, timeout=30000)
