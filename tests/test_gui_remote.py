"""Remote mode: the app's RemoteBackend against the project's own OpenAI-compatible server.

Most tests serve an engine on the tiny model in this process (`serve_engine`), so that what the
model writes can be scripted: `Engine.request_hook` (a Python-only test hook) gives each request
`forced_tokens`, the tokens of a given text. The window test runs the real `ernie-edge serve`
command as a user would. The pieces a server may send in other shapes than ours (a tool call's
arguments in fragments, as vLLM streams them) are tested on the parsing functions directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from gui_helpers import loaded_model, open_window, tiny_edge_dir
from serve_helpers import wait_until
from test_serve_cli import read_until
from ernie_edge.engine import Engine, EngineSettings
from ernie_edge.generate import render_prompt
from ernie_edge.gui.backends import (FINISH_CANCELLED, BackendError, RemoteBackend, RemoteSettings, TurnRequest,
                                     _merge_tool_calls, _sse_events, api_base)
from ernie_edge.sampling import SamplingParams
from ernie_edge.server.run import serve_engine
from ernie_edge.server.settings import ServeSettings

ROOT = Path(__file__).resolve().parent.parent
REASONING = "The user greets me."
CONTENT = "Hello! 你好！"
ANSWER = f"{REASONING}\n</think>\n\n<response>\n{CONTENT}\n</response>"
TOOL_CALL = ('I should look it up.\n</think>\n\n\n<tool_call>\n{"name": "get_weather", '
             '"arguments": {"city": "北京"}}\n</tool_call>\n')
HELLO = [{"role": "user", "content": "hi"}]
KEY = "sk-right"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = Engine(loaded_model(tiny_edge_dir(tmp_path_factory.mktemp("gui-remote"))),
               EngineSettings(slots=2, context=4096))
    yield e
    e.close(drain=False)


@pytest.fixture(scope="module")
def api(engine):
    """The engine served on 127.0.0.1 (a free port); `api.url` + "/v1" is the base URL."""
    server = serve_engine(engine, ServeSettings(model=str(engine.model.path), port=0))
    yield server
    server.stop()


@contextmanager
def forcing(engine, text: str):
    """Every request the engine takes meanwhile writes `text`, then ends its turn."""
    tok = engine.tokenizer
    ids = tok.encode(text) + [tok.im_end_id]
    seen = []

    def hook(request):
        seen.append(request)
        return dataclasses.replace(request, forced_tokens=ids)
    engine.request_hook = hook
    try:
        yield seen
    finally:
        engine.request_hook = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(url: str, key: str = "") -> RemoteBackend:
    b = RemoteBackend(RemoteSettings(url, key))
    b.load(lambda p: None)
    return b


def test_streams_reasoning_answer_and_usage(engine, api):
    b = ready(api.url + "/v1")
    assert b.model == engine.model.path.name
    with forcing(engine, ANSWER) as seen:
        chunks = list(b.submit(TurnRequest(HELLO, SamplingParams(temperature=0.3, top_p=0.9, max_tokens=64, seed=5))))
    assert "".join(c.reasoning for c in chunks) == REASONING
    assert "".join(c.content for c in chunks) == CONTENT
    last = chunks[-1]
    assert last.finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    sent = seen[0]  # what the server made of the request the backend sent
    assert last.stats.prompt_tokens == len(sent.prompt_ids)
    assert last.stats.completion_tokens == len(engine.tokenizer.encode(ANSWER)) + 1  # + the end of turn
    assert list(sent.prompt_ids) == render_prompt(engine.model, HELLO)
    p = sent.params
    assert (p.temperature, p.top_p, p.max_tokens, p.seed) == (0.3, 0.9, 64, 5)


def test_tool_calls_are_assembled(engine, api):
    with forcing(engine, TOOL_CALL):
        chunks = list(ready(api.url).submit(TurnRequest(HELLO, SamplingParams())))
    last = chunks[-1]
    assert last.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in last.tool_calls] == [("get_weather", {"city": "北京"})]
    assert last.tool_calls[0].id.startswith("call_")


def test_tool_call_fragments_and_events_are_parsed():
    """A server that streams a call's arguments in pieces (vLLM does), and its events."""
    lines = ['data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", '
             '"function": {"name": "get_weather", "arguments": ""}}]}}]}',
             "",
             'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"city\\": "}}]}}]}',
             ': a comment line',
             'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\\"北京\\"}"}}]}}]}',
             "data: [DONE]",
             'data: {"never": "read"}']
    calls: dict[int, dict] = {}
    events = list(_sse_events(lines))
    for event in events:
        _merge_tool_calls(calls, event["choices"][0]["delta"]["tool_calls"])
    assert len(events) == 3
    assert calls == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "北京"}'}}
    with pytest.raises(BackendError, match="stopped the answer: overloaded"):
        list(_sse_events(['data: {"error": {"message": "overloaded"}}']))


def test_api_key_is_sent_and_a_wrong_one_is_explained(engine):
    server = serve_engine(engine, ServeSettings(model=str(engine.model.path), port=0, api_key=KEY))
    try:
        assert ready(server.url, KEY).model == engine.model.path.name
        with pytest.raises(BackendError, match="refused the API key"):
            ready(server.url, "sk-wrong")
    finally:
        server.stop()


def test_refusing_url_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match="Could not connect to .* Is the server running"):
        ready(url)


def test_cancel_ends_the_stream_early(engine, api):
    with forcing(engine, "thinking " * 1500):
        turn = ready(api.url).submit(TurnRequest(HELLO, SamplingParams()))
        it = iter(turn)
        next(it)
        turn.cancel()
        rest = list(it)
    assert rest == [rest[-1]] and rest[-1].finish_reason == FINISH_CANCELLED  # no delta after the cancel
    # The server sees the connection close and cancels the request.
    wait_until(lambda: not engine.stats().active_ids, 30, "the request of a client that left cancelled")
    assert engine.stats().finished.get("cancelled", 0) >= 1


def test_api_base_accepts_both_spellings():
    assert api_base("http://h:1") == api_base("http://h:1/v1/") == "http://h:1/v1"


# ---- the window in remote mode -------------------------------------------------------------------

@pytest.fixture
def serve_url(tmp_path_factory):
    """`ernie-edge serve` on the tiny model, as a user runs it."""
    model = tiny_edge_dir(tmp_path_factory.mktemp("gui-serve"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ernie_edge.cli", "serve", "--model", str(model), "--port", str(free_port()),
                             "--threads", "1", "--ctx", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        banner = read_until(proc, "Ctrl-C stops the server", 120)
        url = banner.split("ready at ", 1)[1].split()[0]
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def test_window_in_remote_mode(qtbot, tmp_path, serve_url):
    w = open_window(qtbot, tmp_path, wait_ready=False)
    w.settings.mode, w.settings.remote_url, w.settings.max_tokens = "remote", serve_url, 16
    w.load_backend()
    qtbot.waitUntil(lambda: w.backend is not None, timeout=30000)
    assert w.backend.label.startswith("remote:")
    assert not w.server_toggle.isEnabled() and "remote server" in w.server_toggle.toolTip()
    w.input.setPlainText("Hello")
    w.send()
    qtbot.waitUntil(lambda: not w.controller.busy, timeout=60000)
    answer = w.chat.widgets[1].message
    assert answer.status == "complete" and 1 <= answer.stats["completion_tokens"] <= 16
    assert answer.reasoning or answer.content  # random weights: some text, in one place or the other


def test_window_with_a_refusing_url_says_so(qtbot, tmp_path):
    w = open_window(qtbot, tmp_path, wait_ready=False)
    w.settings.mode, w.settings.remote_url = "remote", f"http://127.0.0.1:{free_port()}/v1"
    w.load_backend()
    qtbot.waitUntil(lambda: w.banner.kind == "model", timeout=15000)
    assert "Could not connect" in w.banner.text() and w.backend is None


def test_window_shows_tool_calls(qtbot, tmp_path, engine, api):
    w = open_window(qtbot, tmp_path, wait_ready=False)
    w.settings.mode, w.settings.remote_url, w.settings.max_tokens = "remote", api.url + "/v1", 256
    w.load_backend()
    qtbot.waitUntil(lambda: w.backend is not None, timeout=15000)
    with forcing(engine, TOOL_CALL):
        w.input.setPlainText("weather in Beijing?")
        w.send()
        qtbot.waitUntil(lambda: not w.controller.busy, timeout=15000)
    answer = w.chat.widgets[1]
    labels = [answer.tools.itemAt(i).widget().text() for i in range(answer.tools.count())]
    assert labels == ['Tool call: get_weather({"city": "北京"})']
    assert answer.message.tool_calls[0]["name"] == "get_weather" and answer.message.finish_reason == "tool_calls"
