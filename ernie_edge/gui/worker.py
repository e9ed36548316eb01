"""Work off the UI thread: the disk thread (the one thread that touches the chat history), the
turn worker (iterates a backend's turn) and one-off background calls (load a model, build the
demo). Results come back to the UI thread through `UiPoster.post`, a queued Qt signal, so the UI
thread never waits on generation or on the disk.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from typing import Any, Callable

from PyQt6.QtCore import QObject, Qt, pyqtSignal

from ..errors import ErnieEdgeError
from .backends import BackendError, Turn, TurnChunk
from .store import ChatStore, StoreError


class UiPoster(QObject):
    """post(fn) from any thread: fn() runs soon on the thread that created the poster (the UI)."""

    _call = pyqtSignal(object)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)  # with a parent, calls still queued when it closes are dropped
        self._closed = False
        self._call.connect(self._run, Qt.ConnectionType.QueuedConnection)

    def close(self) -> None:
        """Drop every later call: the window shut down, and its widgets may already be deleted (a
        model still loading in the background reports progress after that)."""
        self._closed = True

    def post(self, fn: Callable[[], Any]) -> None:
        if self._closed:
            return
        try:
            self._call.emit(fn)
        except RuntimeError:
            pass  # the window is gone (a background job finished after it closed)

    def _run(self, fn) -> None:
        if not self._closed:
            fn()


def run_in_thread(poster: UiPoster, fn: Callable[[], Any], on_done: Callable[[Any], None],
                  on_error: Callable[[str], None], name: str) -> threading.Thread:
    """fn() on a new daemon thread; on_done(result) or on_error(message) on the UI thread. An
    ErnieEdgeError (or OSError) is the user's to read; anything else is a bug: its traceback goes
    to stderr and the message says so."""
    def body():
        try:
            result = fn()
        except (ErnieEdgeError, OSError) as e:
            msg = str(e)
            poster.post(lambda: on_error(msg))
        except Exception as e:  # noqa: BLE001 - a bug, but the window must say something
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e} (a bug in ernie-edge; the traceback is on stderr)"
            poster.post(lambda: on_error(msg))
        else:
            poster.post(lambda: on_done(result))
    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


class DiskThread:
    """The one thread that opens and writes the chat history, so the UI never blocks on the disk.

    Jobs run in the order given. A write that fails (disk full, ...) is kept, with every write
    queued after it, in a backlog that `retry()` (or the next write) runs again in order, so
    nothing the user wrote is dropped and nothing is written out of order. `on_error(message)` is
    called once per failure; `on_saved()` once the backlog has been written."""

    def __init__(self, poster: UiPoster, open_store: Callable[[], ChatStore],
                 on_opened: Callable[[ChatStore], None], on_error: Callable[[str], None],
                 on_saved: Callable[[], None] = lambda: None):
        self.poster = poster
        self.on_error = on_error
        self.on_saved = on_saved
        self.store: ChatStore | None = None
        self.backlog: deque = deque()
        self._failed = False  # a write failed and the backlog is not written yet
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, args=(open_store, on_opened),
                                        name="ernie-edge-disk", daemon=True)
        self._thread.start()

    def read(self, fn: Callable[[ChatStore], Any], on_done: Callable[[Any], None]) -> None:
        self._jobs.put(("read", fn, on_done))

    def write(self, fn: Callable[[ChatStore], Any], on_done: Callable[[Any], None] | None = None) -> None:
        self._jobs.put(("write", fn, on_done))

    def retry(self) -> None:
        self._jobs.put(("retry", None, None))

    def close(self, timeout: float = 10.0) -> bool:
        """Finish the queued jobs, close the database; False if that took longer than timeout."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until the jobs queued so far have run (tests and shutdown only)."""
        done = threading.Event()
        self._jobs.put(("read", lambda s: done.set(), None))
        return done.wait(timeout)

    def _loop(self, open_store, on_opened) -> None:
        try:
            self.store = open_store()
        except Exception as e:  # noqa: BLE001 - whatever stops the history opening, the user is told
            msg = f"The chat history could not be opened: {e}"
            self.poster.post(lambda: self.on_error(msg))
        else:
            store = self.store
            self.poster.post(lambda: on_opened(store))
        while (job := self._jobs.get()) is not None:
            kind, fn, on_done = job
            if self.store is None:
                continue
            if kind == "read":
                self._run(fn, on_done)
            else:
                if kind == "write":
                    self.backlog.append((fn, on_done))
                self._flush()
        if self.store is not None:
            self.store.close()

    def _run(self, fn, on_done) -> bool:
        try:
            result = fn(self.store)
        except (StoreError, OSError) as e:
            msg = str(e)
            self.poster.post(lambda: self.on_error(msg))
            return False
        if on_done is not None:
            self.poster.post(lambda: on_done(result))
        return True

    def _flush(self) -> None:
        """Write the backlog in order; stop at the first failure (reported once until it clears)."""
        while self.backlog:
            fn, on_done = self.backlog[0]
            try:
                result = fn(self.store)
            except (StoreError, OSError) as e:
                if not self._failed:
                    msg = str(e)
                    self.poster.post(lambda: self.on_error(msg))
                self._failed = True
                return
            self.backlog.popleft()
            if on_done is not None:
                self.poster.post(lambda r=result, f=on_done: f(r))
        if self._failed:
            self._failed = False
            self.poster.post(self.on_saved)


class TurnWorker:
    """Iterates one backend turn on a daemon thread; each chunk goes to on_chunk on the UI thread,
    then on_end(last chunk) or on_error(message). cancel() asks the turn to stop (within one step)."""

    def __init__(self, poster: UiPoster, start_turn: Callable[[], Turn],
                 on_chunk: Callable[[TurnChunk], None], on_end: Callable[[TurnChunk], None],
                 on_error: Callable[[str], None]):
        self.poster = poster
        self.turn: Turn | None = None
        self._cancelled = threading.Event()
        self._cb = (on_chunk, on_end, on_error)
        self.thread = threading.Thread(target=self._loop, args=(start_turn,), name="ernie-edge-turn",
                                       daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self._cancelled.set()
        turn = self.turn
        if turn is not None:
            turn.cancel()

    def _loop(self, start_turn) -> None:
        on_chunk, on_end, on_error = self._cb
        try:
            self.turn = start_turn()
            if self._cancelled.is_set():
                self.turn.cancel()
            last = TurnChunk(finish_reason="stop")
            for chunk in self.turn:
                if chunk.finish_reason is not None:
                    last = chunk
                    if chunk.reasoning or chunk.content or chunk.tool_calls:
                        self.poster.post(lambda c=chunk: on_chunk(c))
                else:
                    self.poster.post(lambda c=chunk: on_chunk(c))
            self.poster.post(lambda: on_end(last))
        except BackendError as e:
            msg = str(e)
            self.poster.post(lambda: on_error(msg))
        except Exception as e:  # noqa: BLE001 - a bug; the answer so far must still be saved
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e} (a bug in ernie-edge; the traceback is on stderr)"
            self.poster.post(lambda: on_error(msg))
