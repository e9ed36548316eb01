"""SIGKILL the desktop app while it streams an answer, then check the chat history. Shared by
tests/test_gui_kill.py (10 trials) and benchmarks/gui_kill.py (100 trials, figures).

One trial: start the real app (offscreen) on the tiny model with scripted output; it opens the
history left by the earlier trials, starts a new chat, gets a short answer to completion, then
asks a question whose answer is long; once the answer is streaming (and the disk thread has
committed its 'streaming' row), the parent waits a random time and kills the app with SIGKILL.
Then the history must hold every message committed before, unchanged; the killed answer absent or
'incomplete' (never 'complete'), its text a prefix of what the model was saying; PRAGMA
integrity_check 'ok'; journal mode WAL. The next trial's start is the restart: it must show the
history (the newest chat with its four messages).

    python tests/gui_kill_harness.py child --model DIR --data-dir DIR --trial N   (the app side)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHORT = "ok\n</think>\n\n<response>\nshort answer {n}\n</response>"
LONG = "{thinking}\n</think>\n\n<response>\n{answer}\n</response>"


def long_text(n: int) -> str:
    return LONG.format(thinking=f"trial {n} thinks " * 120, answer=f"trial {n} answers " * 120)


# ---- the app side ---------------------------------------------------------------------------------

def child(args) -> int:
    """Run the app; print JSON events on stdout: ready, short_done, long_streaming."""
    t0 = time.time()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(HERE.parent))
    from PyQt6.QtCore import QTimer
    from PyQt6.QtWidgets import QApplication

    from ernie_edge.gui.backends import LocalBackend, LocalSettings
    from ernie_edge.gui.launch import GuiSettings, build_window

    texts = [SHORT.format(n=args.trial), long_text(args.trial)]

    def factory(settings):
        turns = iter(texts)
        return LocalBackend(LocalSettings(settings.model_path, context=4096, backend=args.backend),
                            forced=lambda req: next(turns))

    app = QApplication(sys.argv[:1])
    w = build_window(GuiSettings(model=args.model, data_dir=args.data_dir, config_dir=args.data_dir,
                                 theme="light"), factory)
    w.show()
    state = {"phase": "open"}

    def emit(event, **extra):
        print(json.dumps({"event": event, "t": time.time() - t0, **extra}), flush=True)

    def tick():
        phase = state["phase"]
        if phase == "open" and w.disk.store is not None and w.list.count() == args.trial and (
                args.trial == 0 or len(w.controller.messages) == 4):
            emit("ready", chats=w.list.count(), messages=[(m.role, m.status) for m in w.controller.messages])
            state["phase"] = "wait_model"
        elif phase == "wait_model" and w.backend is not None:
            w.new_chat()
            w.input.setPlainText(f"trial {args.trial}: short")
            w.send()
            state["phase"] = "short"
        elif phase == "short" and not w.controller.busy:
            state["phase"] = "long"
            w.disk.read(lambda s: None, lambda _: emit("short_done"))
            w.input.setPlainText(f"trial {args.trial}: long")
            w.send()
            # Queued after the question and the answer's 'streaming' row: runs once both are committed.
            w.disk.read(lambda s: None, lambda _: emit("long_streaming"))
        QTimer.singleShot(5, tick)
    QTimer.singleShot(0, tick)
    return app.exec()


# ---- the parent side ------------------------------------------------------------------------------

@dataclass
class TrialResult:
    trial: int
    restart_s: float  # process start -> history shown
    killed_after_s: float
    lost: list[str] = field(default_factory=list)  # committed messages missing or changed
    problems: list[str] = field(default_factory=list)
    inflight_status: str | None = None  # the killed answer: None (absent) or its status


def snapshot(db: Path) -> dict[str, tuple]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT id, conversation_id, position, role, content, reasoning, status FROM messages")}
    finally:
        conn.close()


def _reader(proc) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            try:
                q.put(json.loads(line))
            except ValueError:
                pass
        q.put(None)
    threading.Thread(target=read, daemon=True).start()
    return q


def _wait_event(q: queue.Queue, name: str, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while True:
        try:
            e = q.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"the app did not report {name!r} within {timeout:.0f} s") from None
        if e is None:
            raise RuntimeError(f"the app exited before {name!r}")
        if e["event"] == name:
            return e


def run_trial(model: Path, data_dir: Path, n: int, rng: random.Random, max_kill_s: float = 1.0,
              backend: str = "auto") -> TrialResult:
    from ernie_edge.gui.store import DB_NAME, ChatStore

    db = data_dir / DB_NAME
    before = snapshot(db)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "child", "--model", str(model),
                             "--data-dir", str(data_dir), "--trial", str(n), "--backend", backend],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = _reader(proc)
    try:
        ready = _wait_event(events, "ready", 60)
        restart_s = time.time() - t0
        _wait_event(events, "short_done", 60)
        _wait_event(events, "long_streaming", 60)
        delay = rng.uniform(0.0, max_kill_s)
        time.sleep(delay)  # the random point of the kill: not a stand-in for synchronisation
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = TrialResult(n, restart_s, delay)
    if n > 0 and ready["messages"] != [["user", "complete"], ["assistant", "complete"],
                                       ["user", "complete"], ["assistant", "incomplete"]]:
        result.problems.append(f"restart showed {ready['messages']}")
    raw = snapshot(db)  # as the kill left it
    ChatStore(db).close()  # what the next start does first
    check(db, before, raw, n, result)
    return result


def check(db: Path, before: dict[str, tuple], raw: dict[str, tuple], n: int, result: TrialResult) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            result.problems.append("integrity_check failed")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            result.problems.append("not in WAL mode")
    finally:
        conn.close()
    after = snapshot(db)
    result.lost = [f"{mid}: {row}" for mid, row in before.items() if after.get(mid) != row]
    new = sorted((row for mid, row in after.items() if mid not in before), key=lambda r: r[1])
    texts = [(r[2], r[3]) for r in new]
    want = [("user", f"trial {n}: short"), ("assistant", f"short answer {n}"), ("user", f"trial {n}: long")]
    if texts[:3] != want or any(r[5] != "complete" for r in new[:3]):
        result.problems.append(f"the committed messages of this trial are {texts[:3]}")
    if len(new) == 4:
        mid = next(m for m, row in after.items() if row == new[3])
        role, content, reasoning, status = new[3][2:]
        result.inflight_status = status
        thinking, _, rest = long_text(n).partition("\n</think>")
        answer = rest.split("<response>\n", 1)[1]
        if raw[mid][5] != "streaming" or status != "incomplete":
            result.problems.append(f"the killed answer was {raw[mid][5]} after the kill, {status} after restart")
        if not thinking.startswith(reasoning) or not answer.startswith(content):
            result.problems.append("the killed answer's text is not a prefix of what was being said")


def run_trials(model: Path, data_dir: Path, trials: int, seed: int = 0, max_kill_s: float = 1.0,
               backend: str = "auto", log=None) -> list[TrialResult]:
    rng = random.Random(seed)
    results = []
    for n in range(trials):
        r = run_trial(model, data_dir, n, rng, max_kill_s, backend)
        results.append(r)
        if log:
            log(r)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["child"])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--trial", type=int, required=True)
    p.add_argument("--backend", default="auto", help="ernie_edge.load backend: auto (numba kernels), reference")
    sys.exit(child(p.parse_args()))
