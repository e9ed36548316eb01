"""Dialogs: pick a model (the models store, a folder, the demo, a remote server), convert a
checkpoint (a cancellable, resumable `ernie-edge convert` subprocess with its progress), and the
generation settings."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PyQt6.QtCore import QProcess, Qt
from PyQt6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog,
                             QFormLayout, QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem,
                             QProgressBar, QPushButton, QSpinBox, QTabWidget, QVBoxLayout, QWidget)

from ..formats.recipe import DEFAULT_NAME
from ..paths import models_dir
from .settings import THEMES, AppSettings
from .worker import UiPoster, run_in_thread

_PERCENT = re.compile(r"(\d{1,3})%\|")


@dataclass(frozen=True)
class ModelChoice:
    mode: str  # "local" or "remote"
    path: str = ""
    url: str = ""
    api_key: str = ""
    model: str = ""


class ModelDialog(QDialog):
    """Choose what answers: a converted model on this computer or an OpenAI-compatible server."""

    def __init__(self, settings: AppSettings, poster: UiPoster, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Choose a model")
        self.resize(640, 460)
        self.settings, self.poster = settings, poster
        self.path = settings.model_path
        self.tabs = QTabWidget()
        self.tabs.addTab(self._local_tab(), "On this computer")
        self.tabs.addTab(self._remote_tab(), "Remote server")
        self.tabs.setCurrentIndex(1 if settings.mode == "remote" else 0)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Use this model")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs)
        lay.addWidget(buttons)
        self._refresh()

    def _local_tab(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.addWidget(QLabel(f"Converted models in {models_dir()}:"))
        self.list = QListWidget()
        self.list.currentItemChanged.connect(lambda item, _: item and self._select(item.data(Qt.ItemDataRole.UserRole)))
        lay.addWidget(self.list, 1)
        row = QHBoxLayout()
        for text, slot in (("Open a folder…", self._open_folder), ("Convert a checkpoint…", self._convert),
                           ("Build the demo model", self._demo)):
            b = QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b)
        lay.addLayout(row)
        self.chosen = QLabel("", wordWrap=True)
        self.chosen.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.estimate = QLabel("", wordWrap=True, objectName="muted")
        lay.addWidget(self.chosen)
        lay.addWidget(self.estimate)
        return w

    def _remote_tab(self) -> QWidget:
        w = QWidget()
        form = QFormLayout(w)
        form.addRow(QLabel("Any OpenAI-compatible server: ernie-edge serve, vLLM or FastDeploy running the "
                           "same model on a bigger machine.", wordWrap=True))
        self.url = QLineEdit(self.settings.remote_url, placeholderText="http://127.0.0.1:8080/v1")
        self.key = QLineEdit(self.settings.remote_key, placeholderText="(none)")
        self.key.setEchoMode(QLineEdit.EchoMode.Password)
        self.remote_model = QLineEdit(self.settings.remote_model, placeholderText="(the server's first model)")
        form.addRow("Server URL", self.url)
        form.addRow("API key", self.key)
        form.addRow("Model name", self.remote_model)
        return w

    def _refresh(self) -> None:
        from .models import list_models  # imports the runtime (numba): not before the window shows

        def fill(models):
            self.list.clear()
            for m in models:
                item = QListWidgetItem(m.name)
                item.setData(Qt.ItemDataRole.UserRole, str(m.path))
                self.list.addItem(item)
                if str(m.path) == self.path:
                    self.list.setCurrentItem(item)
            if self.path and not self.list.currentItem():
                self._select(self.path)
        run_in_thread(self.poster, list_models, fill, self._show_error, "ernie-edge-list-models")

    def _select(self, path: str) -> None:
        from .models import memory_estimate
        self.path = path
        self.chosen.setText(f"Model: {path}")
        self.estimate.setText("Estimating memory…")
        context = self.settings.context or 8192
        run_in_thread(self.poster, lambda: memory_estimate(path, context),
                      lambda text: self.path == path and self.estimate.setText(text),
                      self._show_error, "ernie-edge-estimate")

    def _show_error(self, message: str) -> None:
        self.estimate.setText(message)

    def _open_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a converted model folder", str(models_dir()))
        if folder:
            self.list.clearSelection()
            self._select(folder)

    def _convert(self) -> None:
        dialog = ConvertDialog(self)
        if dialog.exec() == QDialog.DialogCode.Accepted and dialog.dest:
            self._select(dialog.dest)
            self._refresh()

    def _demo(self) -> None:
        from ..demo import ensure_demo_model
        self.estimate.setText("Preparing the demo model (a tiny ERNIE trained for this app; a few seconds)…")
        run_in_thread(self.poster, lambda: str(ensure_demo_model()),
                      lambda path: (self._select(path), self._refresh()), self._show_error, "ernie-edge-demo")

    def choice(self) -> ModelChoice:
        if self.tabs.currentIndex() == 1:
            return ModelChoice("remote", url=self.url.text().strip(), api_key=self.key.text().strip(),
                               model=self.remote_model.text().strip())
        return ModelChoice("local", path=self.path)


class ConvertDialog(QDialog):
    """`ernie-edge convert SRC DST` in a subprocess: progress from its bar, Stop kills it, and
    starting again with the same folders resumes from the files already finished."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Convert a Hugging Face checkpoint")
        self.resize(600, 260)
        self.dest: str | None = None
        self.proc: QProcess | None = None
        self.src = QLineEdit(placeholderText="checkpoint folder (or a repo id in the local HF cache)")
        self.dst = QLineEdit(placeholderText="destination folder")
        self.src.textChanged.connect(self._default_dest)
        self.dst.textChanged.connect(self._update_start)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.status = QLabel("Converting writes int4 experts and int8 dense weights (about 12 GB for the "
                             "21B model).", wordWrap=True)
        self.start = QPushButton("Start", objectName="primary")
        self.start.clicked.connect(self._start)
        self.stop = QPushButton("Stop")
        self.stop.setEnabled(False)
        self.stop.clicked.connect(self._stop)
        close = QPushButton("Close")
        close.clicked.connect(self.reject)
        form = QFormLayout()
        src_row = QHBoxLayout()
        src_row.addWidget(self.src, 1)
        src_row.addWidget(browse)
        form.addRow("Checkpoint", src_row)
        form.addRow("Save as", self.dst)
        row = QHBoxLayout()
        row.addStretch(1)
        for b in (self.start, self.stop, close):
            row.addWidget(b)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        lay.addLayout(row)
        self._stderr = ""

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Hugging Face checkpoint folder")
        if folder:
            self.src.setText(folder)

    def _default_dest(self, text: str) -> None:
        name = Path(text.rstrip("/")).name or text.split("/")[-1]
        if name:
            self.dst.setText(str(models_dir() / f"{name}-{DEFAULT_NAME}"))

    def _update_start(self, text: str) -> None:
        resumable = bool(text) and Path(text + ".partial").is_dir()
        self.start.setText("Resume" if resumable else "Start")

    def _start(self) -> None:
        src, dst = self.src.text().strip(), self.dst.text().strip()
        if not src or not dst:
            self.status.setText("Give the checkpoint folder and where to save the converted model.")
            return
        self.proc = QProcess(self)
        self.proc.setProgram(sys.executable)
        self.proc.setArguments(["-m", "ernie_edge.cli", "convert", src, dst])
        self.proc.readyReadStandardError.connect(self._read)
        self.proc.finished.connect(self._finished)
        self._stderr = ""
        self.proc.start()
        self.start.setEnabled(False)
        self.stop.setEnabled(True)
        self.status.setText(f"Converting {src} …")

    def _read(self) -> None:
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace")
        self._stderr = (self._stderr + text)[-4000:]
        found = _PERCENT.findall(text)
        if found:
            self.bar.setValue(int(found[-1]))

    def _stop(self) -> None:
        if self.proc is not None and self.proc.state() != QProcess.ProcessState.NotRunning:
            self.proc.kill()
            self.status.setText("Stopping…")

    def _finished(self, code: int, status) -> None:
        self.start.setEnabled(True)
        self.stop.setEnabled(False)
        dst = self.dst.text().strip()
        self._update_start(dst)
        if status == QProcess.ExitStatus.NormalExit and code == 0:
            self.bar.setValue(100)
            self.dest = dst
            self.status.setText(f"Done: {dst}")
            self.accept()
        elif status != QProcess.ExitStatus.NormalExit:
            self.status.setText("Stopped. Press Resume to carry on from the files already written.")
        else:
            lines = [l for l in self._stderr.replace("\r", "\n").splitlines() if "error" in l.lower()]
            self.status.setText(lines[-1] if lines else f"The converter stopped with code {code}.")

    def reject(self) -> None:
        self._stop()
        super().reject()


class SettingsDialog(QDialog):
    """Sampling, context, threads, look. Context and threads apply when the model is next loaded."""

    def __init__(self, settings: AppSettings, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings = settings
        s = settings
        self.temperature = _double(s.temperature, 0.0, 2.0, 0.05, "0 = always the most likely token")
        self.top_p = _double(s.top_p, 0.05, 1.0, 0.05, "1 = off")
        self.max_tokens = _int(s.max_tokens, 1, 131072, "the longest answer, thinking included")
        self.context = _int(s.context, 512, 131072, "tokens of conversation the model sees; more takes more memory")
        self.threads = _int(s.threads, 0, os.cpu_count() or 1, "0 = all cores")
        self.theme = QComboBox()
        self.theme.addItems(THEMES)
        self.theme.setCurrentText(s.theme)
        self.port = _int(s.server_port, 1024, 65535, "the local API server listens on 127.0.0.1 at this port")
        form = QFormLayout(self)
        for label, widget in (("Temperature", self.temperature), ("Top-p", self.top_p),
                              ("Max tokens", self.max_tokens), ("Context", self.context),
                              ("Threads", self.threads), ("Theme", self.theme), ("API server port", self.port)):
            form.addRow(label, widget)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def result_settings(self) -> AppSettings:
        return dataclasses.replace(
            self.settings, temperature=self.temperature.value(), top_p=self.top_p.value(),
            max_tokens=self.max_tokens.value(), context=self.context.value(), threads=self.threads.value(),
            theme=self.theme.currentText(), server_port=self.port.value())


def _double(value: float, lo: float, hi: float, step: float, tip: str) -> QDoubleSpinBox:
    w = QDoubleSpinBox(minimum=lo, maximum=hi, singleStep=step, decimals=2, value=value)
    w.setToolTip(tip)
    return w


def _int(value: int, lo: int, hi: int, tip: str) -> QSpinBox:
    w = QSpinBox(minimum=lo, maximum=hi, value=value)
    w.setToolTip(tip)
    return w
