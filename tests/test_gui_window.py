"""The desktop app's window (pytest-qt, offscreen) on the tiny model with scripted output
(tests/gui_helpers.py says how): send, Thinking section, Stop, regenerate, edit, history across
restarts, chat list, and the clear messages for a bad model folder, a full disk, a corrupt history.
"""

from __future__ import annotations

import os
import socket
import sqlite3

import pytest
from PyQt6.QtCore import Qt

from gui_helpers import (ANSWER, SCRIPT, THINK, loaded_model, open_window, scripted, scripted_factory, send,
                         tiny_edge_dir)
from ernie_edge.gui.store import ChatStore

LONG = scripted("step by step " * 150, "done")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return loaded_model(tiny_edge_dir(tmp_path_factory.mktemp("gui-window")))


def rows(w) -> list[tuple]:
    """(role, content, reasoning, status, finish_reason) of every message, from the file."""
    assert w.disk.wait_idle()
    conn = sqlite3.connect(w.disk.store.path)
    try:
        return conn.execute("SELECT role, content, reasoning, status, finish_reason FROM messages "
                            "ORDER BY conversation_id, position").fetchall()
    finally:
        conn.close()


def test_reasoning_and_answer_land_in_their_places(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path)
    qtbot.keyClicks(w.input, "line one")
    qtbot.keyClick(w.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    assert w.input.toPlainText() == "line one\n" and not w.controller.busy  # Shift+Enter: new line
    w.input.clear()
    send(qtbot, w, "Hello! 你好")
    user, answer = w.chat.widgets
    assert user.body.toPlainText() == "Hello! 你好"
    assert answer.thinking.text == THINK and not answer.thinking.expanded
    assert answer.thinking.toggle.text().startswith("Thought for")
    shown = answer.body.toPlainText()
    assert "Hello! 你好！" in shown and "print('hi')" in shown and "```" not in shown  # rendered
    assert answer.body.code_blocks == ["print('hi')\n"]
    stats = answer.stats.text()
    assert answer.stats.isVisible() and "tokens" in stats and "tok/s" in stats and "first token" in stats
    assert rows(w) == [("user", "Hello! 你好", "", "complete", None),
                       ("assistant", ANSWER, THINK, "complete", "stop")]
    assert w.list.count() == 1 and w.list.item(0).text() == "Hello! 你好"


def test_thinking_streams_open_then_folds(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [scripted("thinking " * 40, "ok")]), model.path)
    send(qtbot, w, "hi", wait=False)
    answer = w.chat.widgets[1]
    qtbot.waitUntil(lambda: len(answer.thinking.text) > 20, timeout=30000)
    assert answer.thinking.isVisible() and answer.thinking.expanded and not answer.message.content
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=30000)
    assert not answer.thinking.expanded and answer.body.toPlainText() == "ok"
    qtbot.mouseClick(answer.thinking.toggle, Qt.MouseButton.LeftButton)
    assert answer.thinking.expanded and answer.thinking.body.isVisible()


def test_escape_stops_within_one_decode_step(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [LONG]), model.path)
    send(qtbot, w, "think long", wait=False)
    answer = w.chat.widgets[1]
    qtbot.waitUntil(lambda: len(answer.thinking.text) > 30, timeout=30000)
    turn = w.controller.worker.turn
    qtbot.keyClick(w.input, Qt.Key.Key_Escape)  # cancels the turn before it returns
    steps_at_stop = turn.steps  # read after: the engine runs ahead of the window
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=10000)
    assert turn.steps <= steps_at_stop + 1
    assert answer.note.text() == "stopped" and w.send_button.text() == "Send"
    role, content, reasoning, status, finish = rows(w)[1]
    assert (status, finish) == ("incomplete", "cancelled") and LONG.startswith(reasoning)


def test_regenerate_replaces_the_last_answer(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [scripted("a", "first"), scripted("b", "second")]),
                    model.path)
    send(qtbot, w, "question")
    regen = w.chat.widgets[-1].buttons["regenerate"]
    assert regen.isVisible() and not w.chat.widgets[0].buttons["regenerate"].isVisible()
    qtbot.mouseClick(regen, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.controller.busy and w.chat.widgets[-1].message.content == "second", timeout=30000)
    assert len(w.chat.widgets) == 2
    assert [r[1] for r in rows(w)] == ["question", "second"]


def test_edit_and_resend(qtbot, tmp_path, model, monkeypatch):
    texts = [scripted("a", "one"), scripted("b", "two"), scripted("c", "three")]
    w = open_window(qtbot, tmp_path, scripted_factory(model, texts), model.path)
    send(qtbot, w, "first question")
    send(qtbot, w, "second question")
    monkeypatch.setattr(w, "ask_text", lambda *a, **k: ("first, edited", True))
    qtbot.mouseClick(w.chat.widgets[0].buttons["edit"], Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=30000)
    assert [x.message.content for x in w.chat.widgets] == ["first, edited", "three"]
    assert [r[1] for r in rows(w)] == ["first, edited", "three"]


def test_history_is_there_after_a_restart(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path)
    send(qtbot, w, "remember me")
    w.close()
    w2 = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path, wait_ready=False)
    qtbot.waitUntil(lambda: len(w2.chat.widgets) == 2, timeout=10000)
    assert w2.list.count() == 1 and w2.title.text() == "remember me"
    user, answer = w2.chat.widgets
    assert user.message.content == "remember me" and answer.message.content == ANSWER
    assert answer.thinking.text == THINK and answer.thinking.toggle.text().startswith("Thought for")
    assert "tok/s" in answer.stats.text()


def test_chat_list_new_rename_search_delete(qtbot, tmp_path, model, monkeypatch):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [scripted("t", "ok")]), model.path)
    send(qtbot, w, "apples")
    qtbot.keyClick(w.input, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert w.controller.conv is None and not w.chat.widgets
    send(qtbot, w, "bananas")
    qtbot.waitUntil(lambda: w.list.count() == 2)
    monkeypatch.setattr(w, "ask_text", lambda *a, **k: ("Fruit 水果", True))
    w.list.setCurrentRow(0)
    w.rename_selected()
    qtbot.waitUntil(lambda: w.list.item(0) is not None and w.list.item(0).text() == "Fruit 水果")
    w.search.setText("apples")
    qtbot.waitUntil(lambda: w.list.count() == 1 and w.list.item(0).text() == "apples", timeout=3000)
    w.search.clear()
    qtbot.waitUntil(lambda: w.list.count() == 2, timeout=3000)
    monkeypatch.setattr(w, "confirm", lambda q: True)
    w.list.setCurrentRow(1)
    w.delete_selected()
    qtbot.waitUntil(lambda: w.list.count() == 1, timeout=3000)
    assert [r[1] for r in rows(w)] == ["bananas", "ok"]


def test_system_prompt_reaches_the_model(qtbot, tmp_path, model, monkeypatch):
    seen = []
    factory = scripted_factory(model, [scripted("t", "ok")])

    def spying(settings):
        b = factory(settings)
        forced = b.forced
        b.forced = lambda req: (seen.append(req.messages), forced(req))[1]
        return b
    w = open_window(qtbot, tmp_path, spying, model.path)
    monkeypatch.setattr(w, "ask_text", lambda *a, **k: ("Answer in French.", True))
    w.edit_system_prompt()
    send(qtbot, w, "bonjour")
    assert seen[0][0] == {"role": "system", "content": "Answer in French."}
    assert ChatStore(w.disk.store.path).conversations()[0].system_prompt == "Answer in French."


def test_bad_model_folder_is_a_clear_message(qtbot, tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "readme.txt").write_text("hello")
    w = open_window(qtbot, tmp_path / "home", model_path=bad, wait_ready=False)
    qtbot.waitUntil(lambda: w.banner.kind == "model", timeout=10000)
    assert "Could not load the model" in w.banner.text() and str(bad) in w.banner.text()
    assert w.pages.currentWidget() is w.welcome and not w.send_button.isEnabled()


def test_full_disk_is_a_clear_message_and_nothing_is_lost(qtbot, tmp_path, model, monkeypatch):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [scripted("a", "one"), scripted("b", "two")]),
                    model.path)
    send(qtbot, w, "saved question")
    assert w.disk.wait_idle()
    real = ChatStore._write

    def full(self, fn, durable=True):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(ChatStore, "_write", lambda self, fn, durable=True: real(
        self, lambda c: (fn(c), full(self, fn))[0], durable))
    send(qtbot, w, "unsaved question")
    qtbot.waitUntil(lambda: w.banner.kind == "disk", timeout=10000)
    assert "disk is full" in w.banner.text() and "Nothing was lost" in w.banner.text()
    assert [x.message.content for x in w.chat.widgets] == ["saved question", "one", "unsaved question", "two"]
    assert [r[1] for r in rows(w)] == ["saved question", "one"]  # intact
    monkeypatch.undo()  # space freed
    qtbot.mouseClick(w.banner.action, Qt.MouseButton.LeftButton)  # Retry
    qtbot.waitUntil(lambda: not w.banner.isVisible(), timeout=10000)
    assert [(r[1], r[3]) for r in rows(w)] == [("saved question", "complete"), ("one", "complete"),
                                              ("unsaved question", "complete"), ("two", "complete")]


def test_corrupt_history_is_moved_aside_and_the_user_told(qtbot, tmp_path, model):
    (tmp_path / "chats.sqlite3").write_bytes(os.urandom(4096))
    w = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path)
    qtbot.waitUntil(lambda: w.banner.kind == "store", timeout=10000)
    assert "moved aside" in w.banner.text()
    assert len(list(tmp_path.glob("chats.sqlite3.corrupt-*"))) == 1
    send(qtbot, w, "works again")
    assert len(rows(w)) == 2


def test_first_start_without_a_model_offers_the_ways_to_get_one(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, wait_ready=False)
    assert w.pages.currentWidget() is w.welcome
    labels = [b.text() for b in w.welcome.findChildren(type(w.send_button))]
    assert {"Open a converted model folder…", "Convert a Hugging Face checkpoint…",
            "Try the built-in demo model", "Connect to a server…"} <= set(labels)
    assert not w.server_toggle.isEnabled() and "Load a model" in w.server_toggle.toolTip()


def test_api_server_toggle_on_a_port_in_use_says_so(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        w.settings.server_port = taken.getsockname()[1]
        qtbot.mouseClick(w.server_toggle, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: w.banner.kind == "server", timeout=10000)
    assert "could not start" in w.banner.text() and f":{w.settings.server_port}" in w.banner.text()
    assert not w.server_toggle.isChecked() and w.server_toggle.isEnabled() and w.server is None
    send(qtbot, w, "still here")
    assert w.chat.widgets[1].message.content == ANSWER


def test_dark_theme_and_small_window(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path)
    send(qtbot, w, "hi")
    w.set_theme("dark")
    w.resize(800, 600)
    qtbot.waitUntil(lambda: len(w.chat.widgets) == 2, timeout=5000)
    assert w.palette().window().color().lightness() < 60
    assert w.chat.widgets[1].body.toPlainText().startswith("Hello!")
    # Once laid out at 800 px, every message fits the view (no sideways scrolling).
    qtbot.waitUntil(lambda: all(x.width() <= w.chat.viewport().width() - 32 for x in w.chat.widgets), timeout=3000)


def test_streaming_render_matches_the_full_render(qtbot):
    from ernie_edge.gui.chat_view import RichText, StreamingMarkdown
    from ernie_edge.gui.render import MarkdownRenderer
    text = ("# Title\n\npara one\n\n- a\n- b\n\n```python\nx = 1\n\ny = 2\n```\n\n| a | b |\n|---|---|\n"
            "| 1 | 2 |\n\nend 中文 **bold**")
    full = RichText()
    full.setHtml(MarkdownRenderer().render(text).html)
    view = RichText()
    stream = StreamingMarkdown(view, MarkdownRenderer())
    for i in range(1, len(text), 5):
        stream.update(text[:i])
    stream.update(text)

    def lines(t):
        return [line for line in t.splitlines() if line.strip()]
    assert lines(view.toPlainText()) == lines(full.toPlainText())
    assert view.code_blocks == ["x = 1\n\ny = 2\n"]


def _list_items(view):
    """(text, outermost-or-nested depth, number shown) of each list item in a RichText."""
    out, block = [], view.document().begin()
    while block.isValid():
        lst = block.textList()
        if lst is not None and block.text().strip():
            out.append((block.text(), lst.format().indent(), lst.itemText(block)))
        block = block.next()
    return out


def test_streaming_a_tight_list_keeps_one_list_and_renders_only_the_last_item(qtbot):
    """A long tight list is the worst case of a streaming answer: each update must render only the
    newest item, and the items must still form one list, numbered, nested lists nested."""
    from ernie_edge.gui.chat_view import RichText, StreamingMarkdown
    from ernie_edge.gui.render import MarkdownRenderer
    text = ("Steps:\n\n" + "".join(f"{i}. step {i} with **bold**\n" for i in range(1, 8))
            + "   - a nested note\n   - another\n8. last step\n- a new list\n- of two\n\nDone.")
    full = RichText()
    full.setHtml(MarkdownRenderer().render(text).html)
    renderer = MarkdownRenderer()
    rendered = []
    original = renderer.render
    renderer.render = lambda md, **kw: rendered.append(md) or original(md, **kw)
    view = RichText()
    stream = StreamingMarkdown(view, renderer)
    for i in range(1, len(text) + 1, 3):
        rendered.clear()
        stream.update(text[:i])
        assert sum(len(md) for md in rendered) <= 3 * len("7. step 7 with **bold**\n   - a nested note\n")
    stream.update(text, final=True)
    assert _list_items(view) == _list_items(full)
    assert [n for _, depth, n in _list_items(view) if depth == 1][:8] == [f"{i}." for i in range(1, 9)]


def test_callbacks_posted_after_shutdown_are_dropped(qtbot):
    """A background job (a model still loading) may report after the window shut down and its
    widgets were deleted: the poster drops those calls instead of touching dead widgets."""
    from ernie_edge.gui.worker import UiPoster
    poster = UiPoster()
    ran = []
    poster.post(lambda: ran.append("before"))
    qtbot.waitUntil(lambda: ran == ["before"], timeout=2000)
    poster.close()
    poster.post(lambda: ran.append("after"))
    from PyQt6.QtWidgets import QApplication
    QApplication.processEvents()  # deliver whatever was queued
    assert ran == ["before"]
