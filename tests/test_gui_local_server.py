"""The window's "Local API server" toggle (ernie_edge/gui/local_server.py): it serves the engine the
chat uses, in this process. The official `openai` client gets answers from it while the window's
own turn runs on the same engine; switching it off frees the port and leaves the engine to the chat.
"""

from __future__ import annotations

import socket

import openai
import pytest
from PyQt6.QtCore import Qt

from gui_helpers import ANSWER, SCRIPT, loaded_model, open_window, scripted, scripted_factory, send, tiny_edge_dir

ENDLESS = scripted("thinking " * 2000, "never reached")  # runs until Stop: far longer than the API call


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return loaded_model(tiny_edge_dir(tmp_path_factory.mktemp("gui-local-server")))


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_toggle_serves_the_apps_engine_to_the_openai_client(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [ENDLESS, scripted("t", "after")]), model.path)
    engine = w.backend.engine
    w.settings.server_port = 0  # a free port; the window shows the one picked
    qtbot.mouseClick(w.server_toggle, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.server is not None, timeout=30000)
    server = w.server
    port = server.settings.port
    assert w.server_toggle.isChecked() and w.server_url.text() == f"http://127.0.0.1:{port}/v1"
    assert server.state.service.engine is engine  # no second model: the chat's own engine

    send(qtbot, w, "think forever", wait=False)
    answer = w.chat.widgets[1]
    qtbot.waitUntil(lambda: len(answer.thinking.text) > 20, timeout=30000)
    turn = w.controller.worker.turn
    client = openai.OpenAI(base_url=w.server_url.text(), api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [model.path.name]
    r = client.chat.completions.create(model=model.path.name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0.0)
    assert r.usage.completion_tokens <= 6 and r.choices[0].finish_reason in ("length", "stop")
    assert not turn.handle.finished  # the window's turn ran all along, on the same engine
    assert engine.stats().requests_total == 2

    qtbot.keyClick(w.input, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=10000)
    assert answer.message.status == "incomplete"

    qtbot.mouseClick(w.server_toggle, Qt.MouseButton.LeftButton)  # off
    assert w.server is None and w.server_url.text() == "" and not w.server_toggle.isChecked()
    w._chores.submit(lambda: None).result(30)  # the stop runs in the background: wait for it
    assert not server.running and refused(port)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()

    send(qtbot, w, "still there?")  # the engine outlives its server
    assert w.backend.engine is engine and w.chat.widgets[-1].message.content == "after"
    assert engine.stats().requests_total == 3


def test_scripted_chat_is_unchanged_while_the_server_runs(qtbot, tmp_path, model):
    w = open_window(qtbot, tmp_path, scripted_factory(model, [SCRIPT]), model.path)
    w.settings.server_port = 0
    qtbot.mouseClick(w.server_toggle, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.server is not None, timeout=30000)
    send(qtbot, w, "hello")
    assert w.chat.widgets[1].message.content == ANSWER
    port = w.server.settings.port
    w.close()  # closing the window stops the server
    assert refused(port)
