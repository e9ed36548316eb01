"""The conversation on screen: one `MessageWidget` per message in a scrolling `ChatView`.

An answer has a collapsible Thinking section (streams live, folds to "Thought for N s" when the
answer starts), the answer as Markdown (code blocks highlighted, each with a Copy link), tool
calls, and a line of figures (tokens, tokens/s, time to first token). Buttons under a message:
Copy, Edit (your messages), Regenerate (the last answer).
"""

from __future__ import annotations

import time
from typing import Callable

from PyQt6.QtCore import Qt, QTimer, QUrl
from PyQt6.QtGui import (QDesktopServices, QGuiApplication, QTextBlock, QTextBlockFormat,
                         QTextCharFormat, QTextCursor, QTextList)
from PyQt6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QScrollArea, QSizePolicy, QTextBrowser,
                             QToolButton, QVBoxLayout, QWidget)

from .render import COPY_SCHEME, MarkdownRenderer, plain_html, stable_cuts
from .store import Message

MAX_COLUMN_WIDTH = 860
FINISH_NOTES = {"length": "stopped at the token limit", "cancelled": "stopped", "interrupted":
                "interrupted (the app stopped while answering)", "error": "failed"}


class RichText(QTextBrowser):
    """Read-only rich text that grows to fit its document (no scroll bars of its own)."""

    def __init__(self, parent=None, object_name: str = "richText"):
        super().__init__(parent)
        self.setObjectName(object_name)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setOpenLinks(False)
        self.setFocusPolicy(Qt.FocusPolicy.ClickFocus)  # Tab moves between buttons, not every message
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("QTextBrowser { background: transparent; }")
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.code_blocks: list[str] = []
        self.anchorClicked.connect(self._on_anchor)

    def _fit(self, *_):
        h = int(self.document().size().height()) + 4
        if h != self.height():
            self.setFixedHeight(h)

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._fit()

    def wheelEvent(self, event):
        event.ignore()  # let the conversation scroll

    def _on_anchor(self, url: QUrl):
        if url.scheme() == COPY_SCHEME:
            n = int(url.path() or -1)
            if 0 <= n < len(self.code_blocks):
                QGuiApplication.clipboard().setText(self.code_blocks[n])
        elif url.scheme() in ("http", "https", "mailto"):
            QDesktopServices.openUrl(url)


class StreamingMarkdown:
    """Renders a growing answer into a RichText without redoing it all each time: the finished
    blocks (render.stable_cuts) are inserted once; only the open block at the end is removed and
    rendered again. Cost per update: the tail, not the answer.

    A tight list is cut between its items. An item that continues the list already shown is
    rendered on its own and inserted into a new item of that list (QTextList.add), so the list
    reads and numbers as one."""

    def __init__(self, view: RichText, renderer: MarkdownRenderer):
        self.view, self.renderer = view, renderer
        view.clear()
        view.code_blocks = []
        self.cursor = QTextCursor(view.document())
        self.stable = 0  # characters of the text inserted as finished blocks
        self.stable_blocks = 0  # code blocks among them
        self.tail_pos = 0  # document position where the open block's HTML starts
        self.tail_format = self.cursor.blockFormat()  # and the format of the block it starts in
        self.list: QTextList | None = None  # the top-level list the stable part ends in
        self.continues = False  # the tail is the next item of self.list

    def update(self, text: str, final: bool = False) -> None:
        """Show `text` (the whole answer so far). The open block is highlighted only when final."""
        c = self.cursor
        c.setPosition(self.tail_pos)
        c.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        c.removeSelectedText()
        c.setBlockFormat(self.tail_format)  # removing blocks leaves the last one's format (a list's)
        del self.view.code_blocks[self.stable_blocks:]
        for cut in stable_cuts(text):  # each piece on its own: a continued list gets one item
            if cut.end > self.stable:
                self._insert(text[self.stable:cut.end], finished=True)
                self.stable, self.stable_blocks = cut.end, len(self.view.code_blocks)
                self.continues = cut.list_item and self.list is not None
                self._new_block()
                self.tail_pos, self.tail_format = c.position(), c.blockFormat()
        self._insert(text[self.stable:], highlight=final)

    def _insert(self, markdown: str, highlight: bool = True, finished: bool = False) -> None:
        """Insert a piece as HTML. A piece that continues self.list is one item: its first block
        merges into the list item that _new_block made, its nested lists stay nested."""
        first = self.view.document().findBlock(self.cursor.position())
        r = self.renderer.render(markdown, first_block=len(self.view.code_blocks), highlight=highlight)
        self.cursor.insertHtml(r.html)
        self.view.code_blocks += r.code_blocks
        if finished:
            blocks = [first]
            while blocks[-1] != self.cursor.block():
                blocks.append(blocks[-1].next())
            self.list = _last_top_list(blocks)

    def _new_block(self) -> None:
        """Start the block the next HTML goes into: the list's next item when the tail continues
        self.list, else a plain block, so the HTML does not merge into a paragraph, list or table."""
        c = self.cursor
        if self.continues:
            c.insertBlock()
            self.list.add(c.block())
        elif c.block().length() > 1 or c.block().textList() is not None or c.currentTable() is not None:
            c.insertBlock(QTextBlockFormat(), QTextCharFormat())


def _last_top_list(blocks: list[QTextBlock]) -> QTextList | None:
    """The outermost list the last of these blocks belongs to (None after a plain block)."""
    found = None
    for block in blocks:
        lst = block.textList()
        if lst is None:
            found = None
        elif found is None or lst.format().indent() <= found.format().indent():
            found = lst
    return found


class ThinkingSection(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        self.toggle = QToolButton(objectName="thinkingToggle")
        self.toggle.setCheckable(True)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setAccessibleName("Show or hide the thinking")
        self.body = RichText(object_name="thinkingBody")
        lay.addWidget(self.toggle)
        lay.addWidget(self.body)
        self.toggle.toggled.connect(self.set_expanded)
        self.text = ""
        self.set_title("Thinking…")
        self.set_expanded(True)

    def set_title(self, title: str) -> None:
        self.toggle.setText(title)

    def set_expanded(self, expanded: bool) -> None:
        self.toggle.blockSignals(True)
        self.toggle.setChecked(expanded)
        self.toggle.blockSignals(False)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.body.setVisible(expanded)

    @property
    def expanded(self) -> bool:
        return self.toggle.isChecked()

    def set_text(self, text: str) -> None:
        self.text = text
        self.body.setPlainText(text)

    def append(self, delta: str) -> None:
        """Add streamed text at the end without re-laying out what is there."""
        self.text += delta
        cursor = self.body.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(delta)

    def fold(self, seconds: float) -> None:
        self.set_title(f"Thought for {max(1, round(seconds))} s")
        self.set_expanded(False)


class MessageWidget(QFrame):
    """One message. on_action(name, widget) is called for "copy", "edit" and "regenerate"."""

    def __init__(self, message: Message, renderer: MarkdownRenderer,
                 on_action: Callable[[str, "MessageWidget"], None]):
        super().__init__(objectName="message")
        self.message = message
        self.renderer = renderer
        self.setProperty("role", message.role)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.setSpacing(4)
        head = QHBoxLayout()
        self.role = QLabel("You" if message.role == "user" else "ERNIE", objectName="role")
        self.note = QLabel("", objectName="muted")
        head.addWidget(self.role)
        head.addWidget(self.note)
        head.addStretch(1)
        lay.addLayout(head)
        self.thinking = ThinkingSection()
        self.thinking.hide()
        lay.addWidget(self.thinking)
        self.body = RichText()
        lay.addWidget(self.body)
        self.tools = QVBoxLayout()
        lay.addLayout(self.tools)
        self.stats = QLabel("", objectName="stats")
        self.stats.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.stats.hide()
        lay.addWidget(self.stats)
        self.actions = QHBoxLayout()
        self.buttons: dict[str, QToolButton] = {}
        for name, label in (("copy", "Copy"), ("edit", "Edit"), ("regenerate", "Regenerate")):
            b = QToolButton(objectName="link", text=label)
            b.setAccessibleName(f"{label} this message")
            b.clicked.connect(lambda _=False, n=name: on_action(n, self))
            self.buttons[name] = b
            self.actions.addWidget(b)
        self.actions.addStretch(1)
        lay.addLayout(self.actions)
        self.buttons["edit"].setVisible(message.role == "user")
        self.buttons["regenerate"].setVisible(False)
        self.t_start = time.monotonic()
        self.t_answer: float | None = None
        self._stream: StreamingMarkdown | None = None
        self.show_message(message)

    # ---- whole message --------------------------------------------------------------------

    def show_message(self, m: Message) -> None:
        self.message = m
        if m.role == "user":
            self.body.setHtml(plain_html(m.content))
        else:
            self.set_content(m.content)
        if m.reasoning:
            self.thinking.show()
            self.thinking.set_text(m.reasoning)
            seconds = (m.stats or {}).get("thinking_s")
            self.thinking.set_title(f"Thought for {max(1, round(seconds))} s" if seconds else "Thinking")
            self.thinking.set_expanded(not m.content)  # folded once there is an answer to read
        self.set_tool_calls(m.tool_calls)
        self.set_footer(m)

    def finish(self, m: Message) -> None:
        """The answer ended: final text (still incrementally: no full re-render), tool calls, figures."""
        self.message = m
        if self._stream is not None:
            self._stream.update(m.content, final=True)
        elif m.content:
            self.set_content(m.content)
        self.set_tool_calls(m.tool_calls)
        self.set_footer(m)

    def stream_content(self, text: str) -> None:
        """Show the answer so far (cheap: see StreamingMarkdown)."""
        if self._stream is None:
            self._stream = StreamingMarkdown(self.body, self.renderer)
            self.body.show()
        self._stream.update(text)

    def set_content(self, text: str) -> None:
        self._stream = None
        r = self.renderer.render(text)
        self.body.code_blocks = r.code_blocks
        self.body.setHtml(r.html)
        self.body.setVisible(bool(text) or self.message.role == "user")

    def set_tool_calls(self, calls: list[dict]) -> None:
        while self.tools.count():
            w = self.tools.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        for c in calls:
            label = QLabel(f"Tool call: {c['name']}({c['arguments']})", objectName="toolCall")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.tools.addWidget(label)

    def set_footer(self, m: Message) -> None:
        notes = []
        if m.status == "streaming":
            notes.append("answering…")
        elif m.status == "incomplete":
            notes.append(FINISH_NOTES.get(m.finish_reason or "", "incomplete"))
        elif m.finish_reason == "length":
            notes.append(FINISH_NOTES["length"])
        self.note.setText(" · ".join(notes))
        s = m.stats or {}
        if m.role == "assistant" and s.get("completion_tokens"):
            self.stats.setText(format_stats(s))
            self.stats.show()
        else:
            self.stats.hide()

    # ---- streaming ------------------------------------------------------------------------

    def stream_reasoning(self, delta: str) -> None:
        if not self.thinking.isVisible():
            self.thinking.show()
            self.thinking.set_expanded(True)
        self.thinking.append(delta)

    def answer_started(self) -> float:
        """The first answer text arrived: fold the thinking; returns the seconds spent thinking."""
        self.t_answer = time.monotonic()
        seconds = self.t_answer - self.t_start
        if self.thinking.isVisible():
            self.thinking.fold(seconds)
        return seconds


def format_stats(s: dict) -> str:
    parts = [f"{s.get('completion_tokens', 0)} tokens"]
    if s.get("decode_tok_s"):
        parts.append(f"{s['decode_tok_s']:.1f} tok/s")
    if s.get("ttft_s"):
        parts.append(f"first token {s['ttft_s']:.2f} s")
    return " · ".join(parts)


class ChatView(QScrollArea):
    """The message column, centred and at most MAX_COLUMN_WIDTH wide; stays scrolled to the bottom
    while an answer grows, unless the user scrolled up."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("chatArea")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        inner = QWidget(objectName="chatInner")
        outer = QHBoxLayout(inner)
        outer.setContentsMargins(16, 16, 16, 16)
        self.column = QWidget()
        self.column.setMaximumWidth(MAX_COLUMN_WIDTH)
        self.column.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.lay = QVBoxLayout(self.column)
        self.lay.setContentsMargins(0, 0, 0, 0)
        self.lay.setSpacing(12)
        self.lay.addStretch(1)
        outer.addWidget(self.column)
        self.setWidget(inner)
        self.widgets: list[MessageWidget] = []
        self._stick = True
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(lambda v: setattr(self, "_stick", v >= bar.maximum() - 8))
        bar.rangeChanged.connect(lambda lo, hi: self._stick and bar.setValue(hi))

    def clear(self) -> None:
        for w in self.widgets:
            w.setParent(None)
            w.deleteLater()
        self.widgets = []

    def add(self, w: MessageWidget) -> None:
        self.lay.insertWidget(self.lay.count() - 1, w)
        self.widgets.append(w)
        self._stick = True
        QTimer.singleShot(0, self.scroll_to_bottom)

    def remove_from(self, index: int) -> None:
        for w in self.widgets[index:]:
            w.setParent(None)
            w.deleteLater()
        del self.widgets[index:]

    def scroll_to_bottom(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    def mark_last_answer(self) -> None:
        """Only the last answer offers Regenerate."""
        for i, w in enumerate(self.widgets):
            last = i == len(self.widgets) - 1 and w.message.role == "assistant"
            w.buttons["regenerate"].setVisible(last and w.message.status != "streaming")
