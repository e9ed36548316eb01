"""One open conversation: its messages on screen and on disk, and the turn being answered.

Send, Stop, Regenerate and Edit-and-resend live here. Every change is queued to the disk thread
before it shows (the user's message, then the answer as 'streaming', its text every
SAVE_INTERVAL_S, and its end as 'complete' or 'incomplete'); the answer streams in through a
`TurnWorker`, and the Markdown is re-rendered at most every RENDER_MIN_MS (more rarely when a long
answer takes longer to render), so the UI thread stays free however fast tokens come.
"""

from __future__ import annotations

import time
from typing import Callable

from PyQt6.QtCore import QObject, QTimer, pyqtSignal

from ..sampling import SamplingParams
from .backends import FINISH_CANCELLED, Backend, TurnChunk, TurnRequest
from .chat_view import ChatView, MessageWidget
from .render import MarkdownRenderer
from .store import Conversation, Message, new_id
from .worker import DiskThread, TurnWorker, UiPoster

SAVE_INTERVAL_S = 0.5
RENDER_MIN_MS, RENDER_MAX_MS = 50, 500
TITLE_CHARS = 48


def title_for(text: str) -> str:
    line = " ".join(text.split())
    return line[:TITLE_CHARS] + ("…" if len(line) > TITLE_CHARS else "") or "New chat"


def to_openai(conv: Conversation | None, messages: list[Message]) -> list[dict]:
    """The messages as a chat-completions request lists them (system prompt first)."""
    out = [{"role": "system", "content": conv.system_prompt}] if conv and conv.system_prompt else []
    for m in messages:
        d = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for c in m.tool_calls]
        out.append(d)
    return out


class ChatController(QObject):
    busy_changed = pyqtSignal(bool)
    error = pyqtSignal(str)  # a message for the banner
    conversation_saved = pyqtSignal(object)  # Conversation: created or renamed by a send

    def __init__(self, view: ChatView, disk: DiskThread, poster: UiPoster,
                 backend: Callable[[], Backend | None], params: Callable[[], SamplingParams],
                 renderer: MarkdownRenderer):
        super().__init__()
        self.view, self.disk, self.poster = view, disk, poster
        self.backend, self.params, self.renderer = backend, params, renderer
        self.conv: Conversation | None = None
        self.messages: list[Message] = []
        self.worker: TurnWorker | None = None
        self.turn_widget: MessageWidget | None = None
        self._render_timer = QTimer(self, singleShot=True, timeout=self._render)
        self._render_ms = RENDER_MIN_MS
        self._last_save = 0.0
        self._save_pending = False
        self.on_action: Callable[[str, MessageWidget], None] = lambda name, w: None

    @property
    def busy(self) -> bool:
        return self.worker is not None

    # ---- showing a conversation -------------------------------------------------------------

    def open(self, conv: Conversation | None, on_shown: Callable[[], None] = lambda: None) -> None:
        self.conv = conv
        self.messages = []
        self.view.clear()
        if conv is None:
            on_shown()
            return
        conv_id = conv.id

        def show(messages):
            if self.conv is None or self.conv.id != conv_id:
                return  # the user moved on meanwhile
            self.messages = messages
            for m in messages:
                self.view.add(self._widget(m))
            self.view.mark_last_answer()
            on_shown()
        self.disk.read(lambda s: s.messages(conv_id), show)

    def _widget(self, m: Message) -> MessageWidget:
        return MessageWidget(m, self.renderer, lambda name, w: self.on_action(name, w))

    # ---- sending ------------------------------------------------------------------------------

    def send(self, text: str) -> bool:
        """Start a turn with a new user message; False if one is running or no model is ready."""
        if self.busy or not text.strip() or self.backend() is None:
            return False
        if self.conv is None:
            conv = Conversation(new_id(), title_for(text))
            self.conv = conv
            self.disk.write(lambda s: s.create_conversation(conv))
            self.conversation_saved.emit(conv)
        elif not self.messages and self.conv.title == "New chat":
            self.conv.title = title_for(text)
            conv = self.conv
            self.disk.write(lambda s: s.rename_conversation(conv.id, conv.title))
            self.conversation_saved.emit(conv)
        user = Message(new_id(), self.conv.id, len(self.messages), "user", text)
        self._append(user)
        self.disk.write(lambda s, m=_copy(user): s.put_message(m))
        self._start_turn()
        return True

    def regenerate(self) -> None:
        """Drop the last answer and answer the same messages again."""
        if self.busy or not self.messages or self.messages[-1].role != "assistant":
            return
        last = self.messages.pop()
        self.view.remove_from(len(self.messages))
        self.disk.write(lambda s: s.delete_from(last.conversation_id, last.position))
        self._start_turn()

    def edit_and_resend(self, msg: Message, text: str) -> None:
        """Replace a user message's text, drop everything after it, answer again."""
        if self.busy or msg not in self.messages or not text.strip():
            return
        i = self.messages.index(msg)
        msg.content = text
        del self.messages[i + 1:]
        self.view.remove_from(i + 1)
        self.view.widgets[i].show_message(msg)
        self.disk.write(lambda s: s.edit_message(msg.id, text))
        self._start_turn()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def _append(self, m: Message) -> MessageWidget:
        self.messages.append(m)
        w = self._widget(m)
        self.view.add(w)
        return w

    def _start_turn(self) -> None:
        backend = self.backend()
        history = to_openai(self.conv, self.messages)
        answer = Message(new_id(), self.conv.id, len(self.messages), "assistant", status="streaming")
        self.turn_widget = self._append(answer)
        self.view.mark_last_answer()
        self.disk.write(lambda s, m=_copy(answer): s.put_message(m))
        self._last_save = time.monotonic()
        request = TurnRequest(history, self.params())
        self.worker = TurnWorker(self.poster, lambda: backend.submit(request), self._on_chunk,
                                 self._on_end, self._on_error)
        self.busy_changed.emit(True)

    # ---- streaming ----------------------------------------------------------------------------

    def _on_chunk(self, chunk: TurnChunk) -> None:
        w = self.turn_widget
        if w is None:
            return
        m = w.message
        if chunk.reasoning:
            m.reasoning += chunk.reasoning
            w.stream_reasoning(chunk.reasoning)
        if chunk.content:
            if not m.content:
                w.answer_started()
            m.content += chunk.content
            if not self._render_timer.isActive():
                self._render_timer.start(self._render_ms)
        if chunk.tool_calls:
            m.tool_calls += [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in chunk.tool_calls]
            w.set_tool_calls(m.tool_calls)
        self._save_progress()

    def _render(self) -> None:
        w = self.turn_widget
        if w is None:
            return
        t = time.perf_counter()
        w.stream_content(w.message.content)
        spent_ms = (time.perf_counter() - t) * 1000
        # A long answer renders slowly: render it less often so typing stays responsive.
        self._render_ms = int(min(RENDER_MAX_MS, max(RENDER_MIN_MS, 4 * spent_ms)))

    def _save_progress(self) -> None:
        if self._save_pending or time.monotonic() - self._last_save < SAVE_INTERVAL_S:
            return
        m = self.turn_widget.message
        content, reasoning, msg_id = m.content, m.reasoning, m.id
        self._save_pending = True
        self._last_save = time.monotonic()
        self.disk.write(lambda s: s.save_progress(msg_id, content, reasoning),
                        lambda _: setattr(self, "_save_pending", False))

    def _on_end(self, last: TurnChunk) -> None:
        """The turn ended (its last chunk's text and tool calls came through _on_chunk already)."""
        stats = last.stats.to_dict() if last.stats else {}
        cancelled = last.finish_reason == FINISH_CANCELLED
        self._finish("incomplete" if cancelled else "complete", last.finish_reason, stats)

    def _on_error(self, message: str) -> None:
        self._finish("incomplete", "error", {})
        self.error.emit(message)

    def _finish(self, status: str, finish_reason: str | None, stats: dict) -> None:
        w = self.turn_widget
        self.worker, self.turn_widget = None, None
        self._render_timer.stop()
        if w is None:
            return
        m = w.message
        m.status, m.finish_reason = status, finish_reason
        if w.t_answer is not None and m.reasoning:
            stats["thinking_s"] = round(w.t_answer - w.t_start, 2)
        m.stats = stats or None
        self.disk.write(lambda s, m=_copy(m): s.finish_message(m))
        w.finish(m)
        self.view.mark_last_answer()
        self.busy_changed.emit(False)


def _copy(m: Message) -> Message:
    """A snapshot for the disk thread: the UI keeps changing the live message."""
    return Message(m.id, m.conversation_id, m.position, m.role, m.content, m.reasoning, list(m.tool_calls),
                   m.status, m.finish_reason, dict(m.stats) if m.stats else None)
