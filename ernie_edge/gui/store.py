"""The chat history: conversations and messages in one SQLite file. No Qt here.

What it promises (tests/test_gui_store.py and tests/test_gui_kill.py check each):
- WAL journal, one connection used by one thread at a time (the app's disk thread); every write is
  one transaction. (One connection also rules out the WAL-reset bug of SQLite before 3.51.3, which
  needs two.) Message commits run with synchronous=FULL, so a committed message survives a
  crash of the app or of the machine; the partial text of an answer being streamed is saved with
  synchronous=NORMAL (losing the last few of those on power loss loses only unfinished text).
- An assistant message is written first with status 'streaming', then finished as 'complete' or
  'incomplete' (stopped, failed). Opening the store turns every 'streaming' row into 'incomplete'
  (finish_reason 'interrupted'): an answer cut by a crash is never shown as complete.
- A file that is not a healthy database is moved aside (renamed with a timestamp, never deleted)
  and a fresh one started; `ChatStore.notices` tells the user where the old one went.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

DB_NAME = "chats.sqlite3"
SCHEMA_VERSION = 1
STATUSES = ("complete", "streaming", "incomplete")
ROLES = ("system", "user", "assistant", "tool")
KEEP_BACKUPS = 3  # copies taken before replaying a WAL left by a crash
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    tool_calls TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL CHECK (status IN ('complete', 'streaming', 'incomplete')),
    finish_reason TEXT,
    stats TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (conversation_id, position)
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, position);
"""


class StoreError(Exception):
    """A write could not be done (disk full, read-only folder, ...). `message` is for the user."""


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Conversation:
    id: str
    title: str
    system_prompt: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class Message:
    """One message. tool_calls: [{"id", "name", "arguments"}]; stats: tokens and timings of an
    answer ({"completion_tokens", "decode_tok_s", "ttft_s", ...})."""

    id: str
    conversation_id: str
    position: int
    role: str
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    status: str = "complete"
    finish_reason: str | None = None
    stats: dict | None = None


class ChatStore:
    """The history database. Methods are safe to call from any one thread at a time (a lock
    serialises them); the app calls them only from its disk thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.notices: list[str] = []  # what the user should be told after opening
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.backup = keep_before_recovery(self.path)
        try:
            self.conn = self._connect()
        except sqlite3.DatabaseError as e:
            moved = move_aside(self.path)
            self.notices.append(f"The chat history {self.path} could not be opened ({e}). It was moved "
                                f"aside to {moved.name} (nothing was deleted) and a new history started.")
            self.conn = self._connect()
        self._recover()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            # Check before changing anything, so that a file moved aside is kept exactly as it was.
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer ernie-edge (schema {version})")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            conn.close()
            raise
        if mode.lower() != "wal":
            self.notices.append(f"{self.path}: SQLite refused WAL mode ({mode}); is the folder on a "
                                "network share? Keep the history on a local disk.")
        return conn

    def _recover(self) -> None:
        """Answers that were streaming when the app stopped are incomplete, never complete."""
        n = self._write(lambda c: c.execute(
            "UPDATE messages SET status = 'incomplete', finish_reason = 'interrupted' "
            "WHERE status = 'streaming'").rowcount)
        if n:
            self.notices.append(f"{n} answer(s) interrupted when the app last stopped are kept, marked "
                                "incomplete.")

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ---- the write seam ------------------------------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run fn in one IMMEDIATE transaction. durable: synchronous=FULL for this commit (else
        NORMAL). Errors become StoreError with a message for the user; nothing half-written stays."""
        with self._lock:
            c = self.conn
            try:
                c.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                c.execute("BEGIN IMMEDIATE")
                result = fn(c)
                c.execute("COMMIT")
                return result
            except sqlite3.Error as e:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise StoreError(_explain(e, self.path)) from e

    def _read(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            try:
                return self.conn.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(_explain(e, self.path)) from e

    # ---- conversations -------------------------------------------------------------------------

    def conversations(self, search: str = "") -> list[Conversation]:
        """Newest first. search: conversations whose title or any message contains the text."""
        cols = "id, title, system_prompt, created_at, updated_at"
        if not search:
            rows = self._read(f"SELECT {cols} FROM conversations ORDER BY updated_at DESC")
        else:
            like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self._read(
                f"SELECT {cols} FROM conversations c WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS ("
                "SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\') "
                "ORDER BY updated_at DESC", (like, like))
        return [Conversation(*r) for r in rows]

    def create_conversation(self, conv: Conversation) -> None:
        now = time.time()
        conv.created_at = conv.created_at or now
        conv.updated_at = conv.updated_at or now
        self._write(lambda c: c.execute(
            "INSERT INTO conversations (id, title, system_prompt, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (conv.id, conv.title, conv.system_prompt, conv.created_at, conv.updated_at)))

    def rename_conversation(self, conv_id: str, title: str) -> None:
        self._write(lambda c: c.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id)))

    def set_system_prompt(self, conv_id: str, text: str) -> None:
        self._write(lambda c: c.execute("UPDATE conversations SET system_prompt = ? WHERE id = ?",
                                        (text, conv_id)))

    def delete_conversation(self, conv_id: str) -> None:
        self._write(lambda c: c.execute("DELETE FROM conversations WHERE id = ?", (conv_id,)))

    # ---- messages ------------------------------------------------------------------------------

    def messages(self, conv_id: str) -> list[Message]:
        rows = self._read(
            "SELECT id, conversation_id, position, role, content, reasoning, tool_calls, status, "
            "finish_reason, stats FROM messages WHERE conversation_id = ? ORDER BY position", (conv_id,))
        return [Message(*r[:6], tool_calls=json.loads(r[6]), status=r[7], finish_reason=r[8],
                        stats=json.loads(r[9]) if r[9] else None) for r in rows]

    def put_message(self, m: Message) -> None:
        """Insert (or replace) a whole message, durably."""
        if m.role not in ROLES or m.status not in STATUSES:
            raise ValueError(f"message role {m.role!r} / status {m.status!r} is not valid")
        now = time.time()

        def put(c):
            c.execute("INSERT OR REPLACE INTO messages (id, conversation_id, position, role, content, reasoning, "
                      "tool_calls, status, finish_reason, stats, created_at, updated_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (m.id, m.conversation_id, m.position, m.role, m.content, m.reasoning,
                       json.dumps(m.tool_calls, ensure_ascii=False), m.status, m.finish_reason,
                       json.dumps(m.stats) if m.stats is not None else None, now, now))
            _touch(c, m.conversation_id, now)
        self._write(put)

    def save_progress(self, msg_id: str, content: str, reasoning: str) -> None:
        """The text so far of an answer still streaming (not fsynced on every call: see above)."""
        self._write(lambda c: c.execute(
            "UPDATE messages SET content = ?, reasoning = ?, updated_at = ? WHERE id = ? AND status = 'streaming'",
            (content, reasoning, time.time(), msg_id)), durable=False)

    def finish_message(self, m: Message) -> None:
        """The final text, tool calls, status and stats of an answer, durably."""
        if m.status == "streaming":
            raise ValueError("finish_message: the final status is 'complete' or 'incomplete'")
        self.put_message(m)

    def edit_message(self, msg_id: str, content: str) -> None:
        """Replace a message's text and delete every message after it (edit-and-resend), atomically."""
        def edit(c):
            row = c.execute("SELECT conversation_id, position FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                return
            c.execute("UPDATE messages SET content = ?, updated_at = ? WHERE id = ?", (content, time.time(), msg_id))
            c.execute("DELETE FROM messages WHERE conversation_id = ? AND position > ?", row)
            _touch(c, row[0], time.time())
        self._write(edit)

    def delete_from(self, conv_id: str, position: int) -> None:
        """Delete the messages at `position` and after (regenerate drops the last answer)."""
        self._write(lambda c: c.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                                        (conv_id, position)))

    def integrity(self) -> str:
        return self._read("PRAGMA integrity_check")[0][0]


def _touch(c: sqlite3.Connection, conv_id: str, now: float) -> None:
    c.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conv_id))


def _explain(e: sqlite3.Error, path: Path) -> str:
    text = str(e)
    if "full" in text:
        return (f"Could not save to {path}: the disk is full ({text}). Nothing was lost: what is not "
                "saved yet stays in the window and is saved once there is space (free some, then Retry).")
    if "readonly" in text or "read-only" in text:
        return f"Could not save to {path}: the file or its folder is read-only ({text})."
    return f"Could not save to {path}: {text}."


def keep_before_recovery(path: Path, keep: int = KEEP_BACKUPS) -> Path | None:
    """A WAL file at open means the last session did not close cleanly (or a stray WAL was put
    there). SQLite replays it on open and cannot tell whether it belongs to this database, so copy
    the database and its WAL first (NAME.before-recovery-STAMP[-wal]); only the newest `keep` such
    copies are kept. Returns the copy, or None when there was nothing to replay."""
    wal = path.with_name(path.name + "-wal")
    if not path.is_file() or not wal.is_file() or wal.stat().st_size == 0:
        return None
    target = _free_name(path, "before-recovery")
    shutil.copyfile(path, target)
    shutil.copyfile(wal, target.with_name(target.name + "-wal"))
    old = sorted(path.parent.glob(path.name + ".before-recovery-*[0-9]"), key=lambda p: (p.stat().st_mtime, p.name))
    for stale in old[:-keep]:
        stale.unlink()
        stale.with_name(stale.name + "-wal").unlink(missing_ok=True)
    return target


def _free_name(path: Path, what: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{what}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{what}-{stamp}-{n}")
        n += 1
    return target


def move_aside(path: Path) -> Path:
    """Rename a bad database (and its -wal / -shm files) to NAME.corrupt-YYYYmmdd-HHMMSS[-N]."""
    target = _free_name(path, "corrupt")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    if path.exists():
        path.rename(target)
    return target
