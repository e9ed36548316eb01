"""The chat history store (ernie_edge/gui/store.py), the app's settings file, the Markdown
renderer and the desktop entry: the parts of the app that need no window."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest

from ernie_edge.gui import store as store_mod
from ernie_edge.gui.launch import desktop_entry, install_desktop
from ernie_edge.gui.render import MarkdownRenderer
from ernie_edge.gui.settings import AppSettings, load_settings, save_settings
from ernie_edge.gui.store import ChatStore, Conversation, Message, StoreError, new_id


def make_chat(store: ChatStore, title="Chat", n_pairs=1) -> Conversation:
    conv = Conversation(new_id(), title)
    store.create_conversation(conv)
    for i in range(n_pairs):
        store.put_message(Message(new_id(), conv.id, 2 * i, "user", f"question {i}"))
        store.put_message(Message(new_id(), conv.id, 2 * i + 1, "assistant", f"answer {i}", reasoning="hmm",
                                  stats={"completion_tokens": 3}))
    return conv


def test_opens_in_wal_mode_with_full_sync(tmp_path):
    s = ChatStore(tmp_path / "c.sqlite3")
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert s.notices == []


def test_messages_round_trip_in_order(tmp_path):
    s = ChatStore(tmp_path / "c.sqlite3")
    conv = make_chat(s, n_pairs=2)
    s.close()
    s = ChatStore(tmp_path / "c.sqlite3")
    ms = s.messages(conv.id)
    assert [m.content for m in ms] == ["question 0", "answer 0", "question 1", "answer 1"]
    assert ms[1].reasoning == "hmm" and ms[1].stats == {"completion_tokens": 3} and ms[1].status == "complete"


def test_streaming_answer_becomes_incomplete_on_reopen(tmp_path):
    path = tmp_path / "c.sqlite3"
    s = ChatStore(path)
    conv = make_chat(s)
    answer = Message(new_id(), conv.id, 2, "assistant", status="streaming")
    s.put_message(answer)
    s.save_progress(answer.id, "partial ans", "partial thought")
    s.close()  # as if the app died here
    s = ChatStore(path)
    m = s.messages(conv.id)[2]
    assert (m.status, m.finish_reason, m.content, m.reasoning) == (
        "incomplete", "interrupted", "partial ans", "partial thought")
    assert any("interrupted" in n for n in s.notices)


def test_progress_never_touches_a_finished_answer(tmp_path):
    s = ChatStore(tmp_path / "c.sqlite3")
    conv = make_chat(s)
    m = Message(new_id(), conv.id, 2, "assistant", status="streaming")
    s.put_message(m)
    m.content, m.status, m.finish_reason = "final", "complete", "stop"
    s.finish_message(m)
    s.save_progress(m.id, "late partial", "")  # a progress write queued before the end
    assert s.messages(conv.id)[2].content == "final"
    with pytest.raises(ValueError):
        s.finish_message(Message(new_id(), conv.id, 3, "assistant", status="streaming"))


def test_edit_replaces_text_and_drops_what_followed(tmp_path):
    s = ChatStore(tmp_path / "c.sqlite3")
    conv = make_chat(s, n_pairs=2)
    first = s.messages(conv.id)[0]
    s.edit_message(first.id, "edited")
    assert [m.content for m in s.messages(conv.id)] == ["edited"]


def test_delete_from_drops_the_last_answer(tmp_path):
    s = ChatStore(tmp_path / "c.sqlite3")
    conv = make_chat(s, n_pairs=2)
    s.delete_from(conv.id, 3)
    assert [m.content for m in s.messages(conv.id)] == ["question 0", "answer 0", "question 1"]


def test_conversations_rename_search_delete(tmp_path):
    s = ChatStore(tmp_path / "c.sqlite3")
    a = make_chat(s, "Alpha")
    b = make_chat(s, "Beta 100%")
    s.put_message(Message(new_id(), b.id, 2, "user", "天气怎么样"))
    s.rename_conversation(a.id, "Renamed")
    s.set_system_prompt(a.id, "be brief")
    assert [c.title for c in s.conversations()] == ["Beta 100%", "Renamed"]  # newest first
    assert [c.title for c in s.conversations("天气")] == ["Beta 100%"]
    assert [c.title for c in s.conversations("100%")] == ["Beta 100%"]
    assert [c.title for c in s.conversations("0%x")] == []  # % and _ are literal
    assert s.conversations("renamed")[0].system_prompt == "be brief"
    s.delete_conversation(b.id)
    assert [c.title for c in s.conversations()] == ["Renamed"]
    assert s.messages(b.id) == []  # deleted with it


@pytest.mark.parametrize("damage", ["random", "truncated", "newer_schema"])
def test_bad_database_is_moved_aside_and_a_new_one_started(tmp_path, damage):
    path = tmp_path / "c.sqlite3"
    if damage == "random":
        path.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        s = ChatStore(path)
        make_chat(s, n_pairs=50)
        s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        s.close()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
    original = path.read_bytes()
    s = ChatStore(path)
    moved = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1 and moved[0].read_bytes() == original  # kept as it was, never deleted
    assert len(s.notices) == 1 and moved[0].name in s.notices[0]
    make_chat(s)  # the new database works
    assert s.integrity() == "ok"


def test_full_disk_is_a_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    s = ChatStore(tmp_path / "c.sqlite3")
    conv = make_chat(s)

    def full(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")
    real = ChatStore._write
    monkeypatch.setattr(ChatStore, "_write",
                        lambda self, fn, durable=True: real(self, lambda c: (fn(c), full())[0], durable))
    with pytest.raises(StoreError, match="disk is full") as err:
        s.put_message(Message(new_id(), conv.id, 2, "user", "more"))
    assert "Nothing was lost" in str(err.value)
    monkeypatch.undo()
    assert [m.content for m in s.messages(conv.id)] == ["question 0", "answer 0"]  # rolled back, intact
    assert s.integrity() == "ok"


def test_move_aside_never_overwrites(tmp_path):
    path = tmp_path / "c.sqlite3"
    targets = []
    for _ in range(3):
        path.write_text("x")
        targets.append(store_mod.move_aside(path))
    assert len(set(targets)) == 3 and all(t.exists() for t in targets)


# ---- settings -------------------------------------------------------------------------------------

def test_settings_round_trip_private_file(tmp_path):
    s = AppSettings(mode="remote", remote_url="http://x:1/v1", remote_key="sk-secret", temperature=0.3)
    path = save_settings(s, tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it may hold an API key
    loaded, notice = load_settings(tmp_path)
    assert loaded == s and notice is None


def test_bad_settings_file_gives_defaults_and_a_notice(tmp_path):
    (tmp_path / "gui.json").write_text(json.dumps({"theme": "purple"}))
    loaded, notice = load_settings(tmp_path)
    assert loaded == AppSettings() and "theme" in notice


# ---- rendering ------------------------------------------------------------------------------------

def test_markdown_code_blocks_are_highlighted_with_copy_links():
    r = MarkdownRenderer().render("Hi **there** 你好\n\n```python\ndef f():\n    return 1\n```\n\n<b>raw</b>")
    assert r.code_blocks == ["def f():\n    return 1\n"]
    assert 'href="copy:0"' in r.html and "<strong>there</strong>" in r.html and "你好" in r.html
    assert "font-weight: bold" in r.html  # pygments inline styles (the keyword `def`)
    assert "&lt;b&gt;raw&lt;/b&gt;" in r.html  # the model's HTML is text, not markup


# ---- desktop entry --------------------------------------------------------------------------------

def test_install_desktop_writes_entry_and_icons(tmp_path):
    desktop = tmp_path / "Desktop"
    desktop.mkdir()
    written = install_desktop(data_home=tmp_path / "share", desktop=desktop)
    entry = (tmp_path / "share" / "applications" / "ernie-edge.desktop").read_text()
    assert "[Desktop Entry]" in entry and "Terminal=false" in entry
    exec_line = next(l for l in entry.splitlines() if l.startswith("Exec="))
    assert "ernie-edge-gui" in exec_line or "-m ernie_edge.gui.app" in exec_line
    icon = next(l for l in entry.splitlines() if l.startswith("Icon="))[5:]
    assert os.path.getsize(icon) > 1000
    assert (desktop / "ernie-edge.desktop").stat().st_mode & stat.S_IXUSR
    assert len(written) == 4


def test_desktop_entry_quotes_paths_with_spaces():
    entry = desktop_entry('"/opt/my apps/ernie-edge-gui"', "/x.png")
    assert 'Exec="/opt/my apps/ernie-edge-gui" %U' in entry


def test_a_stray_wal_of_another_database_is_not_applied(tmp_path):
    a = ChatStore(tmp_path / "a.sqlite3")
    conv = make_chat(a, "Mine", n_pairs=2)
    a.close()
    b = ChatStore(tmp_path / "b.sqlite3")
    b.conn.execute("PRAGMA wal_autocheckpoint = 0")
    make_chat(b, "Other", n_pairs=20)
    (tmp_path / "a.sqlite3-wal").write_bytes((tmp_path / "b.sqlite3-wal").read_bytes())
    a = ChatStore(tmp_path / "a.sqlite3")  # SQLite replays it: it cannot tell whose WAL it is
    assert a.integrity() == "ok"
    # ... but the database as it was is kept first, with that WAL beside it.
    assert (tmp_path / (a.backup.name + "-wal")).read_bytes() == (tmp_path / "b.sqlite3-wal").read_bytes()
    check = tmp_path / "check.sqlite3"
    check.write_bytes(a.backup.read_bytes())
    assert sqlite3.connect(check).execute("SELECT title FROM conversations").fetchall() == [("Mine",)]


def test_only_the_newest_backups_before_recovery_are_kept(tmp_path):
    path = tmp_path / "c.sqlite3"
    make_chat(ChatStore(path))
    for _ in range(5):
        (tmp_path / "c.sqlite3-wal").write_bytes(b"x" * 100)  # a WAL left behind (here: not a valid one)
        ChatStore(path).close()
    assert len(list(tmp_path.glob("c.sqlite3.before-recovery-*[0-9]"))) == store_mod.KEEP_BACKUPS


def test_stable_cuts_follow_blank_lines_outside_code_and_split_tight_lists():
    from ernie_edge.gui.render import Cut, stable_cuts
    assert stable_cuts("one\n\ntwo") == [Cut(len("one\n\n"), False)]
    assert stable_cuts("one\n\n```\na\n\nb") == [Cut(len("one\n\n"), False)]  # inside an open fence: not yet
    assert stable_cuts("```\na\n\nb\n```\n\nc") == [Cut(len("```\na\n\nb\n```\n\n"), False)]
    assert stable_cuts("no blank line yet") == []
    # A tight list: a cut before each item of the same kind, none inside an item or a nested list.
    assert stable_cuts("- a\n  more\n  - n\n- b\n- c") == [Cut(len("- a\n  more\n  - n\n"), True),
                                                        Cut(len("- a\n  more\n  - n\n- b\n"), True)]
    assert stable_cuts("1. a\n2) b\n2) c") == [Cut(len("1. a\n2) b\n"), True)]  # ")" starts another list
    assert stable_cuts("text\n- a\n- b") == []  # a list that interrupts a paragraph: no item cuts
    assert stable_cuts("- a\n```\nx\n```\n- b") == []  # a fence at column 0 ends the list