"""The main window: conversations on the left; on the right the open chat, a banner for what the
user must know, and the message box. The model loads in the background after the window shows.

Keys: Enter sends, Shift+Enter starts a new line, Esc stops an answer, Ctrl+N new chat, Ctrl+F
search, F2 rename, Delete deletes the selected chat, Ctrl+, settings.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from PyQt6.QtCore import Qt, QTimer, pyqtSignal
from PyQt6.QtGui import QGuiApplication, QKeySequence, QShortcut
from PyQt6.QtWidgets import (QApplication, QDialog, QFileDialog, QFrame, QHBoxLayout, QInputDialog, QLabel,
                             QLineEdit, QListWidget, QListWidgetItem, QMainWindow, QMenu, QMessageBox,
                             QPlainTextEdit, QProgressBar, QPushButton, QSizePolicy, QSplitter, QStackedWidget,
                             QToolButton, QVBoxLayout, QWidget)

from ..sampling import SamplingParams
from .backends import Backend, LocalBackend, LocalSettings, LoadProgress, RemoteBackend, RemoteSettings
from .chat_view import ChatView, MessageWidget
from .conversation import ChatController
from .dialogs import ConvertDialog, ModelDialog, SettingsDialog
from .local_server import api_url, start_server
from .render import MarkdownRenderer
from .settings import AppSettings, save_settings
from .store import DB_NAME, ChatStore, Conversation, new_id
from .theme import apply_theme, resolve_theme
from .worker import DiskThread, UiPoster, run_in_thread

BackendFactory = Callable[[AppSettings], "Backend | None"]


def make_backend(s: AppSettings) -> Backend | None:
    """The backend the settings describe, not loaded yet; None when no model is chosen."""
    if s.mode == "remote" and s.remote_url:
        return RemoteBackend(RemoteSettings(s.remote_url, s.remote_key, s.remote_model))
    if s.mode == "local" and s.model_path:
        return LocalBackend(LocalSettings(s.model_path, threads=s.threads, context=s.context))
    return None


class Composer(QPlainTextEdit):
    """The message box: Enter sends, Shift+Enter inserts a new line."""

    submit = pyqtSignal()

    def keyPressEvent(self, event):
        enter = event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        if enter and not event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self.submit.emit()
            return
        super().keyPressEvent(event)


class ElidedLabel(QLabel):
    """A one-line label that ends in "…" when it does not fit, instead of being cut."""

    def __init__(self, text: str = "", **kwargs):
        super().__init__(**kwargs)
        self.full = ""
        self.setText(text)

    def setText(self, text: str) -> None:
        self.full = text
        self.setToolTip(text)
        self._elide()

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        super().setText(self.fontMetrics().elidedText(self.full, Qt.TextElideMode.ElideRight, max(self.width(), 40)))

    def text(self) -> str:
        return self.full


class Banner(QFrame):
    """A message across the top of the chat, with an optional action button and a close button."""

    def __init__(self):
        super().__init__(objectName="banner")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(12, 8, 8, 8)
        self.label = QLabel("", wordWrap=True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.action = QPushButton()
        close = QToolButton(text="✕", objectName="link")
        close.setAccessibleName("Dismiss the message")
        close.clicked.connect(self.hide)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.action)
        lay.addWidget(close)
        self._slot: Callable | None = None
        self.action.clicked.connect(lambda: self._slot and self._slot())
        self.kind = ""
        self.hide()

    def show_message(self, text: str, kind: str = "info", action: tuple[str, Callable] | None = None):
        self.kind = kind
        self.label.setText(text)
        self.action.setVisible(action is not None)
        if action:
            self.action.setText(action[0])
            self._slot = action[1]
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class MainWindow(QMainWindow):
    def __init__(self, settings: AppSettings, data_dir: Path, config_dir: Path,
                 backend_factory: BackendFactory = make_backend, notices: list[str] = (),
                 start_demo: bool = False):
        super().__init__()
        self.settings, self.config_dir = settings, config_dir
        self.backend_factory = backend_factory
        self.backend: Backend | None = None  # loaded and ready
        self.loading: Backend | None = None
        self.server = None  # the Local API server (server.run.RunningServer) while it runs
        self._server_starting = False
        self.poster = UiPoster(self)
        # Saving settings, stopping the API server, closing an old model: off the UI thread, in order.
        self._chores = ThreadPoolExecutor(1, thread_name_prefix="ernie-edge-chores")
        self.theme = resolve_theme(settings.theme)
        self.renderer = MarkdownRenderer(self.theme.html)
        self.setWindowTitle("ernie-edge")
        self.resize(1100, 720)
        self.setMinimumSize(640, 480)
        self._build()
        self.disk = DiskThread(self.poster, lambda: ChatStore(Path(data_dir) / DB_NAME), self._store_opened,
                               self._store_error, self._store_saved)
        self.controller = ChatController(self.chat, self.disk, self.poster, lambda: self.backend,
                                         self._params, self.renderer)
        self.controller.on_action = self._message_action
        self.controller.busy_changed.connect(self._busy_changed)
        self.controller.error.connect(lambda msg: self.banner.show_message(msg, "error"))
        self.controller.conversation_saved.connect(lambda conv: self._refresh_list(select=conv.id))
        for notice in notices:
            self.banner.show_message(notice)
        self._shortcuts()
        self._update_state()
        # The first start opens the built-in demo model, so a new user sees the app answer at once.
        QTimer.singleShot(0, self.use_demo_model if start_demo else self.load_backend)

    # ---- layout -------------------------------------------------------------------------------

    def _build(self) -> None:
        split = QSplitter()
        split.addWidget(self._sidebar())
        split.addWidget(self._main())
        split.setStretchFactor(1, 1)
        split.setSizes([220, 880])
        split.setChildrenCollapsible(False)
        self.setCentralWidget(split)
        bar = self.statusBar()
        self.status = QLabel("")
        self.progress = QProgressBar(maximumWidth=160, textVisible=False)
        self.progress.setRange(0, 0)
        self.progress.hide()
        self.server_toggle = QToolButton(text="Local API server", checkable=True)
        self.server_toggle.toggled.connect(self._toggle_server)
        self.server_url = QLabel("")
        self.server_url.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bar.addWidget(self.status, 1)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.server_url)
        bar.addPermanentWidget(self.server_toggle)
        self._load_clock = QTimer(self, interval=1000, timeout=self._tick_load)

    def _sidebar(self) -> QWidget:
        side = QWidget(objectName="sidebar")
        side.setMinimumWidth(170)
        side.setMaximumWidth(360)
        lay = QVBoxLayout(side)
        lay.setContentsMargins(10, 10, 10, 10)
        self.new_button = QPushButton("New chat", objectName="primary")
        self.new_button.setToolTip("Ctrl+N")
        self.new_button.clicked.connect(self.new_chat)
        self.search = QLineEdit(placeholderText="Search chats")
        self.search.setClearButtonEnabled(True)
        self.search.setAccessibleName("Search chats")
        self._search_timer = QTimer(self, singleShot=True, interval=200, timeout=self._refresh_list)
        self.search.textChanged.connect(lambda _: self._search_timer.start())
        self.list = QListWidget()
        self.list.setAccessibleName("Chats")
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._list_menu)
        self.list.currentItemChanged.connect(self._list_selected)
        for w in (self.new_button, self.search, self.list):
            lay.addWidget(w)
        return side

    def _main(self) -> QWidget:
        main = QWidget()
        lay = QVBoxLayout(main)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        header = QWidget(objectName="header")
        h = QHBoxLayout(header)
        h.setContentsMargins(16, 8, 12, 8)
        self.title = ElidedLabel("New chat", objectName="title")
        self.title.setMinimumWidth(80)
        self.title.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.system_button = QPushButton("System prompt")
        self.system_button.clicked.connect(self.edit_system_prompt)
        self.model_button = QPushButton("Choose a model…")
        self.model_button.setToolTip("Model and server")
        self.model_button.clicked.connect(self.choose_model)
        settings_button = QPushButton("Settings")
        settings_button.setToolTip("Ctrl+,")
        settings_button.clicked.connect(self.edit_settings)
        h.addWidget(self.title, 1)
        for b in (self.system_button, self.model_button, settings_button):
            h.addWidget(b)
        lay.addWidget(header)
        self.banner = Banner()
        lay.addWidget(self.banner)
        self.pages = QStackedWidget()
        self.chat = ChatView()
        self.welcome = self._welcome()
        self.pages.addWidget(self.chat)
        self.pages.addWidget(self.welcome)
        lay.addWidget(self.pages, 1)
        lay.addWidget(self._composer())
        return main

    def _composer(self) -> QWidget:
        box = QWidget(objectName="composer")
        h = QHBoxLayout(box)
        h.setContentsMargins(16, 10, 16, 12)
        self.input = Composer()
        self.input.setPlaceholderText("Message ERNIE  (Enter to send, Shift+Enter for a new line)")
        self.input.setAccessibleName("Message")
        self.input.setFixedHeight(72)
        self.input.submit.connect(self.send)
        self.send_button = QPushButton("Send", objectName="primary")
        self.send_button.setAccessibleName("Send or stop")
        self.send_button.clicked.connect(lambda: self.stop() if self.controller.busy else self.send())
        h.addWidget(self.input, 1)
        h.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
        return box

    def _welcome(self) -> QWidget:
        page = QWidget(objectName="welcome")
        lay = QVBoxLayout(page)
        lay.setContentsMargins(48, 48, 48, 48)
        lay.addStretch(1)
        title = QLabel("Chat with ERNIE, offline", objectName="welcomeTitle")
        text = QLabel("No model is open yet. Open a model converted with `ernie-edge convert`, convert a "
                      "Hugging Face checkpoint here, try the built-in demo model (a tiny ERNIE trained for "
                      "this app: small sums, unit conversions, capitals, weather and calculator tool calls), "
                      "or connect to a server.", wordWrap=True)
        lay.addWidget(title)
        lay.addWidget(text)
        for label, slot in (("Open a converted model folder…", self.open_model_folder),
                            ("Convert a Hugging Face checkpoint…", self.convert_checkpoint),
                            ("Try the built-in demo model", self.use_demo_model),
                            ("Connect to a server…", self.choose_model)):
            b = QPushButton(label)
            b.clicked.connect(slot)
            lay.addWidget(b, 0, Qt.AlignmentFlag.AlignLeft)
        lay.addStretch(2)
        return page

    def _shortcuts(self) -> None:
        for keys, slot in (("Esc", self.stop), ("Ctrl+N", self.new_chat), ("Ctrl+F", self.search.setFocus),
                           ("Ctrl+,", self.edit_settings), ("Ctrl+L", self.input.setFocus)):
            QShortcut(QKeySequence(keys), self, activated=slot)
        QShortcut(QKeySequence("F2"), self.list, activated=self.rename_selected,
                  context=Qt.ShortcutContext.WidgetShortcut)
        QShortcut(QKeySequence("Delete"), self.list, activated=self.delete_selected,
                  context=Qt.ShortcutContext.WidgetShortcut)

    # ---- state --------------------------------------------------------------------------------

    def _update_state(self) -> None:
        busy = self.controller.busy
        ready = self.backend is not None
        self.send_button.setText("Stop" if busy else "Send")
        self.send_button.setEnabled(busy or ready)
        self.send_button.setToolTip("Esc" if busy else ("Enter" if ready else "No model is ready yet"))
        self.list.setEnabled(not busy)
        self.new_button.setEnabled(not busy)
        self.list.setToolTip("Stop the answer to switch chats" if busy else "")
        no_model = self.backend is None and self.loading is None
        self.pages.setCurrentWidget(self.welcome if no_model and not self.controller.messages else self.chat)
        conv = self.controller.conv
        self.title.setText(conv.title if conv else "New chat")
        label = (self.backend or self.loading).label if (self.backend or self.loading) else "Choose a model…"
        self.model_button.setText(label.split(": ", 1)[-1][:32])
        self._update_server_toggle()

    def _update_server_toggle(self) -> None:
        """The toggle serves the engine of a model loaded here; a remote server is one already."""
        serving = self.server is not None
        local = isinstance(self.backend, LocalBackend) and self.backend.engine is not None
        self.server_toggle.setEnabled((local or serving) and not self._server_starting)
        if local:
            tip = ("Serve the open model to other programs on this computer at an OpenAI-compatible URL "
                   f"(127.0.0.1, port {self.settings.server_port}); the chat and the API share it")
        elif isinstance(self.backend or self.loading, RemoteBackend):
            tip = ("Not available with a remote server: it has its own API (the URL in Model → Remote "
                   "server); the Local API server serves a model loaded in this app")
        else:
            tip = "Load a model in this app first: the Local API server serves the model the app has loaded"
        self.server_toggle.setToolTip(tip)

    def _busy_changed(self, busy: bool) -> None:
        self._update_state()
        if not busy:
            self.input.setFocus()

    def _params(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens or None)

    def _save_settings(self) -> None:
        snapshot, folder = dataclasses.replace(self.settings), self.config_dir
        future = self._chores.submit(save_settings, snapshot, folder)
        future.add_done_callback(lambda f: f.exception() and self.poster.post(
            lambda: self.banner.show_message(f"Could not save the settings: {f.exception()}", "error")))

    # ---- the model ----------------------------------------------------------------------------

    def load_backend(self) -> None:
        """(Re)create the backend from the settings and load it in the background."""
        if self.controller.busy:
            return
        old, self.backend = self.backend, None
        self._stop_server()
        if old is not None:
            self._chores.submit(old.close)  # after the server's stop; waits for the engine's current step
        backend = self.backend_factory(self.settings)
        self.loading = backend
        self._update_state()
        if backend is None:
            self.status.setText("No model: choose one to start")
            return
        self._load_started = time.monotonic()
        self._load_stage = "Loading"
        self.progress.show()
        self._load_clock.start()

        def progress(p: LoadProgress):
            self.poster.post(lambda: self._load_progress(backend, p))
        run_in_thread(self.poster, lambda: backend.load(progress), lambda _: self._loaded(backend),
                      lambda msg: self._load_failed(backend, msg), "ernie-edge-load")

    def _load_progress(self, backend: Backend, p: LoadProgress) -> None:
        if backend is self.loading:
            self._load_stage = p.stage
            self._tick_load()

    def _tick_load(self) -> None:
        self.status.setText(f"{self._load_stage}  ({time.monotonic() - self._load_started:.0f} s)")

    def _loaded(self, backend: Backend) -> None:
        if backend is not self.loading:
            backend.close()
            return
        self.backend, self.loading = backend, None
        self._load_clock.stop()
        self.progress.hide()
        self.status.setText(f"Ready: {backend.label}  (loaded in {time.monotonic() - self._load_started:.1f} s)")
        if self.banner.kind == "model":
            self.banner.hide()
        self._update_state()

    def _load_failed(self, backend: Backend, message: str) -> None:
        if backend is not self.loading:
            return
        self.loading = None
        self._load_clock.stop()
        self.progress.hide()
        self.status.setText("No model")
        self.banner.show_message(message, "model", ("Choose a model…", self.choose_model))
        self._update_state()

    def _apply_model(self, **changes) -> None:
        self.settings = dataclasses.replace(self.settings, **changes)
        self._save_settings()
        self.load_backend()

    def choose_model(self) -> None:
        if self.controller.busy:
            return
        dialog = ModelDialog(self.settings, self.poster, self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        c = dialog.choice()
        if c.mode == "remote":
            self._apply_model(mode="remote", remote_url=c.url, remote_key=c.api_key, remote_model=c.model)
        elif c.path:
            self._apply_model(mode="local", model_path=c.path)

    def open_model_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a converted model folder")
        if folder:
            self._apply_model(mode="local", model_path=folder)

    def convert_checkpoint(self) -> None:
        dialog = ConvertDialog(self)
        if dialog.exec() == QDialog.DialogCode.Accepted and dialog.dest:
            self._apply_model(mode="local", model_path=dialog.dest)

    def use_demo_model(self) -> None:
        from ..demo import ensure_demo_model
        self.status.setText("Preparing the demo model…")
        run_in_thread(self.poster, lambda: str(ensure_demo_model()),
                      lambda path: self._apply_model(mode="local", model_path=path),
                      lambda msg: self.banner.show_message(msg, "error"), "ernie-edge-demo")

    def edit_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        old, self.settings = self.settings, dialog.result_settings()
        self._save_settings()
        if self.settings.theme != old.theme:
            self.set_theme(self.settings.theme)
        if (self.settings.threads, self.settings.context) != (old.threads, old.context) and self.settings.mode == "local":
            self.load_backend()

    def set_theme(self, name: str) -> None:
        self.theme = resolve_theme(name)
        apply_theme(QApplication.instance(), self.theme)
        self.renderer.set_colors(self.theme.html)
        if not self.controller.busy:
            self.controller.open(self.controller.conv, self._update_state)

    # ---- the local API server -----------------------------------------------------------------

    def _toggle_server(self, on: bool) -> None:
        if not on:
            self._stop_server()
            return
        backend = self.backend
        if not isinstance(backend, LocalBackend) or backend.engine is None:
            self._server_refused("The local API server serves a model loaded in this app; open one first.")
            return
        engine, port = backend.engine, self.settings.server_port
        self._server_starting = True  # the toggle waits until it listens or fails
        self._update_server_toggle()
        self.server_url.setText("starting…")
        run_in_thread(self.poster, lambda: start_server(engine, port), lambda s: self._server_started(backend, s),
                      self._server_refused, "ernie-edge-server")

    def _server_started(self, backend: Backend, server) -> None:
        self._server_starting = False
        if backend is not self.backend or not self.server_toggle.isChecked():  # the model changed meanwhile
            threading.Thread(target=server.stop, name="ernie-edge-server-stop", daemon=True).start()
            self._update_server_toggle()
            return
        self.server = server
        self.server_url.setText(api_url(server))
        self._update_server_toggle()

    def _server_refused(self, message: str) -> None:
        self._server_starting = False
        self._stop_server()
        self.banner.show_message(message, "server")

    def _stop_server(self) -> None:
        """Stop the API server (in the background: requests still running get a few seconds); the
        engine keeps running for the chat."""
        if self.server is not None:
            server, self.server = self.server, None
            self._chores.submit(server.stop)
        self.server_url.setText("")
        self.server_toggle.blockSignals(True)
        self.server_toggle.setChecked(False)
        self.server_toggle.blockSignals(False)
        self._update_server_toggle()

    # ---- chats ------------------------------------------------------------------------------

    def _store_opened(self, store: ChatStore) -> None:
        for notice in store.notices:
            self.banner.show_message(notice, "store")
        self._refresh_list(select_first=True)

    def _store_error(self, message: str) -> None:
        self.banner.show_message(message, "disk", ("Retry", self.disk.retry))

    def _store_saved(self) -> None:
        if self.banner.kind == "disk":
            self.banner.hide()
        self.status.setText("All changes saved")

    def _refresh_list(self, select: str | None = None, select_first: bool = False) -> None:
        query = self.search.text().strip()
        current = select or (self.controller.conv.id if self.controller.conv else None)

        def fill(convs: list[Conversation]):
            self.list.blockSignals(True)
            self.list.clear()
            for c in convs:
                item = QListWidgetItem(c.title)
                item.setData(Qt.ItemDataRole.UserRole, c)
                item.setToolTip(c.title)
                self.list.addItem(item)
                if c.id == current:
                    self.list.setCurrentItem(item)
            self.list.blockSignals(False)
            if select_first and current is None and convs and not self.controller.messages:
                self.list.setCurrentRow(0)
        self.disk.read(lambda s: s.conversations(query), fill)

    def _list_selected(self, item: QListWidgetItem | None, _prev=None) -> None:
        if item is None or self.controller.busy:
            return
        conv: Conversation = item.data(Qt.ItemDataRole.UserRole)
        if self.controller.conv is None or conv.id != self.controller.conv.id:
            self.controller.open(conv, self._update_state)
            self._update_state()

    def _list_menu(self, pos) -> None:
        if self.list.itemAt(pos) is None:
            return
        menu = QMenu(self)
        menu.addAction("Rename…", self.rename_selected)
        menu.addAction("Delete…", self.delete_selected)
        menu.exec(self.list.mapToGlobal(pos))

    def new_chat(self) -> None:
        if self.controller.busy:
            return
        self.list.clearSelection()
        self.list.setCurrentItem(None)
        self.controller.open(None)
        self._update_state()
        self.input.setFocus()

    def rename_selected(self) -> None:
        item = self.list.currentItem()
        if item is None:
            return
        conv: Conversation = item.data(Qt.ItemDataRole.UserRole)
        title, ok = self.ask_text("Rename chat", "New name:", conv.title, multiline=False)
        if ok and title.strip():
            conv.title = title.strip()
            self.disk.write(lambda s: s.rename_conversation(conv.id, conv.title), lambda _: self._refresh_list())
            if self.controller.conv and self.controller.conv.id == conv.id:
                self.controller.conv.title = conv.title
                self._update_state()

    def delete_selected(self) -> None:
        item = self.list.currentItem()
        if item is None or self.controller.busy:
            return
        conv: Conversation = item.data(Qt.ItemDataRole.UserRole)
        if not self.confirm(f"Delete the chat “{conv.title}”? This cannot be undone."):
            return
        self.disk.write(lambda s: s.delete_conversation(conv.id), lambda _: self._refresh_list())
        if self.controller.conv and self.controller.conv.id == conv.id:
            self.new_chat()

    def edit_system_prompt(self) -> None:
        conv = self.controller.conv
        text, ok = self.ask_text("System prompt", "Instructions for this chat (empty for none):",
                                 conv.system_prompt if conv else "")
        if not ok:
            return
        if conv is None:
            conv = self.controller.conv = Conversation(new_id(), "New chat", text)
            self.disk.write(lambda s: s.create_conversation(conv), lambda _: self._refresh_list(select=conv.id))
        else:
            conv.system_prompt = text
            self.disk.write(lambda s: s.set_system_prompt(conv.id, text))

    # ---- messages -----------------------------------------------------------------------------

    def send(self) -> None:
        text = self.input.toPlainText()
        if not text.strip():
            return
        if self.backend is None:
            self.banner.show_message("No model is ready yet: choose one, or wait for it to load.", "model",
                                     ("Choose a model…", self.choose_model))
            return
        if self.controller.send(text):
            self.input.clear()
            self._update_state()

    def stop(self) -> None:
        self.controller.stop()

    def _message_action(self, name: str, w: MessageWidget) -> None:
        if name == "copy":
            QGuiApplication.clipboard().setText(w.message.content)
            self.status.setText("Copied")
        elif name == "regenerate":
            self.controller.regenerate()
        elif name == "edit":
            text, ok = self.ask_text("Edit and resend", "Your message:", w.message.content)
            if ok:
                self.controller.edit_and_resend(w.message, text)

    # ---- dialogs (tests replace these two) ----------------------------------------------------

    def ask_text(self, title: str, label: str, text: str, multiline: bool = True) -> tuple[str, bool]:
        if multiline:
            return QInputDialog.getMultiLineText(self, title, label, text)
        return QInputDialog.getText(self, title, label, QLineEdit.EchoMode.Normal, text)

    def confirm(self, question: str) -> bool:
        return QMessageBox.question(self, "ernie-edge", question) == QMessageBox.StandardButton.Yes

    # ---- closing ------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the answer (kept as incomplete), write everything queued, close the history."""
        worker = self.controller.worker
        if worker is not None:
            worker.cancel()
            worker.thread.join(timeout)
            QApplication.processEvents()  # the turn's end queues its final write
        self.disk.close(timeout)
        self._stop_server()
        self._chores.shutdown(wait=True)
        self.poster.close()  # UI updates posted from now on (a load still running) are dropped
        if self.backend is not None:
            self.backend.close()

    def closeEvent(self, event):
        self.shutdown()
        super().closeEvent(event)
